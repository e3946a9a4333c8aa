"""Peak memory of one training step (forward + backward + gradients, no optimizer): reversible vs
standard stack against depth, and the longest sequence that trains in the same memory with full vs
LSH attention.

Memory comes from XLA's compiled memory analysis (temp + argument + output bytes of the jitted
step), so it is exact for the compiled program and needs no run: it works for sizes this CPU could
not execute. Models are narrow so that activations, not weights, dominate (the regime where
reversibility matters). Note: one reversible "layer" (block) holds 2 attention + 1 FFN sub-layers,
one standard layer 1 + 1. The step takes the abstract parameters of the state builder's train-state
layout (scaling_sparse/state.py) on a single-device mesh. Method: docs/benchmarks.md.

    python benchmarks/train_memory.py            # JSON + plot under benchmarks/results/
    python benchmarks/train_memory.py --quick    # smaller sweep (a smoke test)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and the checkout importable
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import machine, reporting  # noqa: E402
from scaling_sparse import sharding, state  # noqa: E402
from scaling_sparse.config import base_config, validate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def bench_config(**overrides):
    """The narrow model of every measurement, with `overrides` on config.model (a full config)."""
    c = base_config()
    c.model.update(vocab_size=256, d_model=64, d_ff=128, n_heads=2, n_layers=2, max_len=1024, dropout=0.0,
                   attn_dropout=0.0)
    c.model.update(**overrides)
    c.train.seq_len = min(c.train.seq_len, c.model.max_len)
    return validate(c)


def step_memory(config, batch: int, seq_len: int) -> dict:
    """Bytes of one compiled training step: temp (activations, workspace), argument (params, tokens)
    and output (gradients). Nothing is allocated: the step is lowered with the abstract parameters."""
    layout = state.train_state_layout(config, sharding.single_device_mesh())
    graphdef = layout.graphdef

    def train_step(params, tokens, rng):
        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens, mode="train", rng=rng)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

        return jax.grad(loss)(params)

    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    start = time.perf_counter()
    stats = jax.jit(train_step).lower(layout.abstract["params"], tokens, key).compile().memory_analysis()
    out = {"temp": int(stats.temp_size_in_bytes), "argument": int(stats.argument_size_in_bytes),
           "output": int(stats.output_size_in_bytes)}
    out["total"] = out["temp"] + out["argument"] + out["output"]
    out["compile_s"] = round(time.perf_counter() - start, 2)
    return out


def depth_sweep(depths, batch, seq_len, log):
    rows = []
    for reversible in (False, True):
        for depth in depths:
            mem = step_memory(bench_config(n_layers=depth, reversible=reversible, max_len=seq_len), batch, seq_len)
            rows.append({"reversible": reversible, "n_layers": depth, **mem})
            log(f"  {'reversible' if reversible else 'standard  '} layers {depth:3d}: "
                f"{mem['total'] / 2**20:9.1f} MiB (temp {mem['temp'] / 2**20:9.1f})  [{mem['compile_s']} s]")
    return rows


def longest_sequence(attention: str, budget: int, batch: int, chunk: int, start: int, log, cap: int):
    """Largest multiple of `chunk` (doubling, then bisection) whose step fits in `budget` bytes."""
    probes = []

    def fits(length):
        mem = step_memory(bench_config(reversible=True, attention=attention, lsh_chunk_len=chunk, max_len=length),
                          batch, length)
        probes.append({"seq_len": length, **mem})
        log(f"  {attention:4s} seq {length:6d}: {mem['total'] / 2**20:8.1f} MiB "
            f"{'fits' if mem['total'] <= budget else 'over'}  [{mem['compile_s']} s]")
        return mem["total"] <= budget

    lo, hi = 0, start
    while hi <= cap and fits(hi):  # doubling
        lo, hi = hi, hi * 2
    hi = min(hi, cap + chunk)
    while hi - lo > chunk and hi - lo > lo // 8:  # bisection to within 1/8 (or one chunk)
        mid = (lo + hi) // 2 // chunk * chunk
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sweep for a smoke test")
    parser.add_argument("--out", default=str(RESULTS / f"train_memory_{machine.machine_kind()}"))
    args = parser.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731

    depths = (2, 4) if args.quick else (6, 12, 24, 48)
    depth_seq, batch = (256, 1) if args.quick else (4096, 1)
    log(f"depth sweep (batch {batch}, seq {depth_seq}):")
    rows = depth_sweep(depths, batch, depth_seq, log)

    def growth(reversible):
        by = {r["n_layers"]: r["total"] for r in rows if r["reversible"] == reversible}
        a, b = (depths[0], depths[-1]) if args.quick else (12, 48)
        return by[b] / by[a] - 1.0

    chunk = 32 if args.quick else 64
    cap = 4096 if args.quick else 65536

    def length_search(full_len):
        """Longest full and LSH sequences within the memory of full attention's step at full_len."""
        budget = step_memory(bench_config(reversible=True, max_len=full_len), batch, full_len)["total"]
        log(f"longest sequence in {budget / 2**20:.1f} MiB (full attention's step at {full_len}):")
        full_longest, full_probes = longest_sequence("full", budget, batch, chunk, full_len, log, cap)
        lsh_longest, lsh_probes = longest_sequence("lsh", budget, batch, chunk, full_len, log, cap)
        return {"batch": batch, "budget_bytes": budget, "budget_from_full_seq_len": full_len, "n_layers": 2,
                "lsh_chunk_len": chunk, "lsh_n_hashes": 1,
                "full": {"longest": full_longest, "probes": full_probes},
                "lsh": {"longest": lsh_longest, "probes": lsh_probes},
                "lsh_over_full": lsh_longest / max(full_longest, 1)}

    # Two budgets: full attention's memory is quadratic in length, LSH's linear, so the ratio grows
    # with the budget; both are reported.
    lengths = [length_search(n) for n in ((256,) if args.quick else (1024, 2048))]
    result = {
        **reporting.run_header("train_memory"),
        "method": "jax.jit(step).lower(...).compile().memory_analysis(): temp + argument + output bytes",
        "model": {k: v for k, v in bench_config().model.items()
                  if k in ("vocab_size", "d_model", "d_ff", "n_heads", "dtype")},
        "depth": {"batch": batch, "seq_len": depth_seq, "rows": rows,
                  "growth_12_to_48": {"standard": growth(False), "reversible": growth(True)}},
        "length": lengths[0],
        "lengths": lengths,
    }
    out = pathlib.Path(args.out)
    log(reporting.format_train_memory(result, args.quick))
    reporting.write_json(out.with_suffix(".json"), result)
    reporting.plot_train_memory(result, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
