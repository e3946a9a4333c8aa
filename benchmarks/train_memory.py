"""Peak memory of one training step (forward + backward + gradients, no optimizer): reversible vs
standard stack against depth, and the longest sequence that trains in the same memory with full vs
LSH attention.

Memory comes from XLA's compiled memory analysis (temp + argument + output bytes of the jitted
step), so it is exact for the compiled program and needs no run: it works for sizes this CPU could
not execute. Models are narrow so that activations, not weights, dominate (the regime where
reversibility matters). Note: one reversible "layer" (block) holds 2 attention + 1 FFN sub-layers,
one standard layer 1 + 1.

    python benchmarks/train_memory.py            # JSON + plot under benchmarks/results/
    python benchmarks/train_memory.py --quick    # smaller sweep (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flax import nnx  # noqa: E402

from benchmarks.machine import machine_info  # noqa: E402
from scaling_sparse.config import base_config, validate  # noqa: E402
from scaling_sparse.model import DecoderLM  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def model_config(**overrides):
    c = base_config()
    c.model.update(vocab_size=256, d_model=64, d_ff=128, n_heads=2, n_layers=2, max_len=1024, dropout=0.0,
                   attn_dropout=0.0)
    c.model.update(**overrides)
    c.train.seq_len = min(c.train.seq_len, c.model.max_len)
    return validate(c).model


def step_memory(m, batch: int, seq_len: int) -> dict:
    """Bytes of one compiled training step: temp (activations, workspace), argument (params, tokens)
    and output (gradients)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(m, rngs=nnx.Rngs(0))))

    def train_step(state, tokens, rng):
        def loss(state):
            logits = nnx.merge(graphdef, state)(tokens, mode="train", rng=rng)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

        return jax.grad(loss)(state)

    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    start = time.perf_counter()
    stats = jax.jit(train_step).lower(state, tokens, key).compile().memory_analysis()
    out = {"temp": int(stats.temp_size_in_bytes), "argument": int(stats.argument_size_in_bytes),
           "output": int(stats.output_size_in_bytes)}
    out["total"] = out["temp"] + out["argument"] + out["output"]
    out["compile_s"] = round(time.perf_counter() - start, 2)
    return out


def depth_sweep(depths, batch, seq_len, log):
    rows = []
    for reversible in (False, True):
        for depth in depths:
            m = model_config(n_layers=depth, reversible=reversible, max_len=seq_len)
            mem = step_memory(m, batch, seq_len)
            rows.append({"reversible": reversible, "n_layers": depth, **mem})
            log(f"  {'reversible' if reversible else 'standard  '} layers {depth:3d}: "
                f"{mem['total'] / 2**20:9.1f} MiB (temp {mem['temp'] / 2**20:9.1f})  [{mem['compile_s']} s]")
    return rows


def longest_sequence(attention: str, budget: int, batch: int, chunk: int, start: int, log, cap: int):
    """Largest multiple of `chunk` (doubling, then bisection) whose step fits in `budget` bytes."""
    probes = []

    def fits(length):
        m = model_config(reversible=True, attention=attention, lsh_chunk_len=chunk, max_len=length)
        mem = step_memory(m, batch, length)
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


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for reversible, style in ((False, "o-"), (True, "s-")):
        rows = [r for r in result["depth"]["rows"] if r["reversible"] == reversible]
        ax1.plot([r["n_layers"] for r in rows], [r["total"] / 2**20 for r in rows], style,
                 label="reversible" if reversible else "standard")
    ax1.set_xlabel("layers")
    ax1.set_ylabel("peak training-step memory (MiB)")
    ax1.set_title(f"depth, seq {result['depth']['seq_len']}")
    ax1.legend()
    for entry, color in zip(result["lengths"], ("C0", "C1", "C2")):
        for name, style in (("full", "o"), ("lsh", "s")):
            probes = sorted(entry[name]["probes"], key=lambda p: p["seq_len"])
            ax2.plot([p["seq_len"] for p in probes], [p["total"] / 2**20 for p in probes], style + "-", color=color,
                     fillstyle="none" if name == "full" else "full",
                     label=f"{name}, budget {entry['budget_bytes'] / 2**20:.0f} MiB: longest {entry[name]['longest']}")
        ax2.axhline(entry["budget_bytes"] / 2**20, color=color, ls="--", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("sequence length")
    ax2.set_ylabel("MiB")
    ax2.set_title("reversible, full vs LSH attention")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sweep for a smoke test")
    parser.add_argument("--out", default=str(RESULTS / f"train_memory_{jax.default_backend()}"))
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
        budget = step_memory(model_config(reversible=True, max_len=full_len), batch, full_len)["total"]
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
        "benchmark": "train_memory",
        "machine": machine_info(),
        "method": "jax.jit(step).lower(...).compile().memory_analysis(): temp + argument + output bytes",
        "model": {k: v for k, v in model_config().items()
                  if k in ("vocab_size", "d_model", "d_ff", "n_heads", "dtype")},
        "depth": {"batch": batch, "seq_len": depth_seq, "rows": rows,
                  "growth_12_to_48": {"standard": growth(False), "reversible": growth(True)}},
        "length": lengths[0],
        "lengths": lengths,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    g = result["depth"]["growth_12_to_48"]
    log(f"growth {'first->last' if args.quick else '12->48'} layers: standard {g['standard']:+.1%}, "
        f"reversible {g['reversible']:+.1%}")
    for entry in lengths:
        log(f"longest sequence in {entry['budget_bytes'] / 2**20:.1f} MiB: full {entry['full']['longest']}, "
            f"lsh {entry['lsh']['longest']} ({entry['lsh_over_full']:.1f}x)")
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
