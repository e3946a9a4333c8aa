"""The paper's 17B rows at full depth, decoded unbatched on this machine with int8 weights (issue 31).

A 17B model is 68 GB in float32 and 34 GB in bfloat16; with int8 weights (docs/quantization.md) it is ~17.5 GB,
so it fits a 24 GB machine, one model at a time. Each model runs in its own process, built directly into int8
(benchmarks/models.py build_random_int8: never a float copy), after a read-bandwidth probe; the processes
alternate dense, sparse, Terraformer for --rounds rounds. Per run: ms/token of --tokens tokens decoded greedily
in one jitted loop after a 16-token prompt (decode_timing.py, the medium benchmark's timer), the share of the
read floor (weight bytes per token / the probe's read bandwidth), peak resident memory, and, for the sparse
models, how many distinct units each sparse-FFN block chose over a 64-token decode.

    python benchmarks/decode_17b.py                  # 3 rounds, ~15 min on 2 cores, needs ~19 GB free memory
    python benchmarks/decode_17b.py --quick          # tiny models, 1 round (a smoke test)

Writes benchmarks/results/decode_17b_cpu.json and .png, and prints a table beside the paper's figures (dense
3.690 s/token, sparse 0.183 s (20x), Terraformer 37x and under 100 ms; measured in float32 on the authors' CPU).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and the checkout importable
    sys.path.insert(0, str(ROOT))

from benchmarks import machine, reporting  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SPARSE_ALL = dict(ff_sparsity=8, attn_sparsity=4, loss_sparsity=4)
# name -> (preset, model overrides)
MODELS = {"dense": ("paper_17b_dense", {}), "sparse": ("paper_17b_sparse", {}),
          "terraformer": ("paper_17b_terraformer", {})}
QUICK_MODELS = {"dense": ("tiny", {}), "sparse": ("tiny", SPARSE_ALL),
                "terraformer": ("tiny", dict(reversible=True, ff_sru_units=8, **SPARSE_ALL))}
PAPER = {"dense_s_per_token": 3.690, "sparse_s_per_token": 0.183, "sparse_speedup": 20.0,
         "terraformer_speedup": 37.0, "terraformer_s_per_token_below": 0.100,
         "source": "the paper's 17B rows (Sparse is Enough in Scaling Transformers, section 4; docs/semantics.md): float32, "
                   "unbatched, on the authors' CPU"}


def config_of(name: str, quick: bool):
    from benchmarks import models
    from scaling_sparse.config import load_config

    preset, overrides = (QUICK_MODELS if quick else MODELS)[name]
    config = load_config(preset)
    config.model.update(**overrides)
    config = models.with_overrides(config, dtype="float32")  # float32 activations, dropout 0
    config.model.weights = "int8"
    return preset, config


def distinct_units(decoder, prompt, tokens: int) -> dict | None:
    """Greedy decode of `tokens` tokens after `prompt`, recording each sparse-FFN block's chosen unit
    (layers/sparse_ffn.py recording_units) -> distinct units per block over those tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from scaling_sparse.kernels import cpu as cpu_kernels
    from scaling_sparse.layers.sparse_ffn import recording_units

    @jax.jit
    def step(params, cache, token, index):
        with recording_units(), cpu_kernels.use_kernels(decoder.cpu_kernels):
            model = nnx.merge(decoder.graphdef, params)
            logits, cache = model.decode(token[:, None], cache, index)
            units = jax.tree.leaves(nnx.state(model, nnx.Intermediate))
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache, units

    cache = decoder.init_cache(decoder.params, 1, prompt.shape[1] + tokens)
    token, cache = decoder.prefill(decoder.params, prompt, cache, jax.random.PRNGKey(0))
    chosen = []
    for i in range(tokens):
        token, cache, units = step(decoder.params, cache, token, jnp.int32(prompt.shape[1] + i))
        if not units:
            return None  # no sparse FFN
        chosen.append(np.stack([np.asarray(u).reshape(-1) for u in units]))  # [layers, blocks]
    chosen = np.stack(chosen)  # [tokens, layers, blocks]
    distinct = np.array([[len(set(chosen[:, layer, block])) for block in range(chosen.shape[2])]
                         for layer in range(chosen.shape[1])])
    return {"tokens": tokens, "distinct_mean": float(distinct.mean()), "distinct_min": int(distinct.min()),
            "distinct_max": int(distinct.max()), "layers": int(distinct.shape[0]), "blocks": int(distinct.shape[1])}


def child(args) -> dict:
    """One model in this process: bandwidth probe, int8 weights, timed decode, distinct units, peak RSS."""
    import resource

    import jax

    from benchmarks import models
    from benchmarks.decode_timing import DecodeTimer
    from scaling_sparse.decode import Decoder
    from scaling_sparse.params import report_params

    bandwidth = machine.measure_bandwidth(args.bandwidth_mb << 20, repeats=5)  # before the weights take memory
    preset, config = config_of(args.child, args.quick)
    m = config.model
    start = time.perf_counter()
    graphdef, params = models.build_random_int8(config, seed=args.seed)
    build_s = time.perf_counter() - start
    decoder = Decoder(graphdef, params, max_len=m.max_len)
    timer = DecodeTimer(decoder, vocab_size=m.vocab_size, prompt_len=args.prompt_len, tokens=args.tokens,
                        per_call_tokens=1, seed=args.seed)
    for _ in range(args.repeats):
        timer.loop_once()
    ms = statistics.median(timer.loop)
    counts = report_params(config)
    units = distinct_units(decoder, timer.prompt, args.unit_tokens) if m.ff_sparsity else None
    if units:
        units["units_per_block"] = m.ff_sparsity
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"model": args.child, "preset": preset, "round": args.round, "n_layers": m.n_layers,
            "total_params": counts["total_params"], "params_per_token": counts["params_per_token"],
            "bytes_per_token": counts["bytes_per_token"], "weight_bytes": reporting_bytes(params),
            "build_s": build_s, "compile_s": timer.compile_s, "ms_per_token": ms, "ms_per_token_repeats": timer.loop,
            "decode_path": "cpu_kernels" if timer.kernel_targets else "jax", "cpu_kernel_targets": timer.kernel_targets,
            "bandwidth": bandwidth, **reporting.bandwidth_figures(counts["bytes_per_token"], ms, bandwidth),
            "peak_rss_bytes": rss, "distinct_units": units, "devices": [str(d) for d in jax.devices()]}


def reporting_bytes(params) -> int:
    from scaling_sparse.state import params_bytes

    return params_bytes(params)


def summarise(rows: list[dict], names: list[str]) -> dict:
    out = {}
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        ms = [r["ms_per_token"] for r in mine]
        out[name] = {"ms_per_token_median": statistics.median(ms), "ms_per_token_min": min(ms),
                     "ms_per_token_max": max(ms), "rounds": len(mine),
                     "read_floor_share_median": statistics.median(r["read_bandwidth_fraction"] for r in mine),
                     "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in mine),
                     "total_params": mine[0]["total_params"], "bytes_per_token": mine[0]["bytes_per_token"],
                     "distinct_units": mine[-1]["distinct_units"]}
    if "dense" in out:
        for name, s in out.items():
            s["speedup_vs_dense"] = out["dense"]["ms_per_token_median"] / s["ms_per_token_median"]
            # Per round: each model against the dense run of the same round (the machine's state then).
            per_round = [next(d for d in rows if d["model"] == "dense" and d["round"] == r["round"])["ms_per_token"]
                         / r["ms_per_token"] for r in rows if r["model"] == name
                         and any(d["model"] == "dense" and d["round"] == r["round"] for d in rows)]
            s["speedup_vs_dense_rounds"] = per_round
    return out


def format_table(summary: dict) -> str:
    head = (f"{'model':<13}{'params':>8}{'GB/tok':>8}{'ms/token':>10}{'min-max':>17}{'speedup':>9}{'%read':>7}"
            f"{'peak RSS':>10}{'units/block':>13}")
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        units = s["distinct_units"]
        unit_text = (f"{units['distinct_mean']:.1f} of {units['units_per_block']}" if units else "-")
        lines.append(f"{name:<13}{s['total_params'] / 1e9:>7.2f}B{s['bytes_per_token'] / 1e9:>8.3f}"
                     f"{s['ms_per_token_median']:>10.1f}{s['ms_per_token_min']:>8.1f}-{s['ms_per_token_max']:<8.1f}"
                     f"{s.get('speedup_vs_dense', float('nan')):>8.1f}x{100 * s['read_floor_share_median']:>6.0f}%"
                     f"{s['peak_rss_bytes_max'] / 2**30:>9.1f}G{unit_text:>13}")
    lines.append(f"paper (float32, the authors' CPU): dense {PAPER['dense_s_per_token'] * 1e3:.0f} ms, sparse "
                 f"{PAPER['sparse_s_per_token'] * 1e3:.0f} ms ({PAPER['sparse_speedup']:.0f}x), Terraformer "
                 f"{PAPER['terraformer_speedup']:.0f}x, under {PAPER['terraformer_s_per_token_below'] * 1e3:.0f} ms")
    return "\n".join(lines)


def plot(summary: dict, path: pathlib.Path) -> None:
    plt = reporting._pyplot()
    names = list(summary)
    fig, ax = plt.subplots(figsize=(7, 4))
    ms = [summary[n]["ms_per_token_median"] for n in names]
    errs = [[m - summary[n]["ms_per_token_min"] for n, m in zip(names, ms)],
            [summary[n]["ms_per_token_max"] - m for n, m in zip(names, ms)]]
    ax.bar(names, ms, yerr=errs, capsize=4, color=["black", "tab:red", "tab:purple"][:len(names)], label="this run, int8")
    paper = {"dense": PAPER["dense_s_per_token"] * 1e3, "sparse": PAPER["sparse_s_per_token"] * 1e3,
             "terraformer": PAPER["dense_s_per_token"] * 1e3 / PAPER["terraformer_speedup"]}
    ax.scatter(names, [paper[n] for n in names], marker="_", s=600, color="tab:blue", zorder=3,
               label="paper (float32, its CPU)")
    ax.set_yscale("log")
    ax.set_ylabel("ms per token (batch 1, log scale)")
    for i, n in enumerate(names):
        ax.annotate(f"{ms[i]:.1f} ms ({summary[n].get('speedup_vs_dense', 1):.0f}x)", (i, ms[i]), ha="center",
                    xytext=(0, 5), textcoords="offset points", fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("17B models at full depth, int8 weights, unbatched decode", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="dense,sparse,terraformer")
    p.add_argument("--rounds", type=int, default=None, help="rounds of the alternation (default 3; --quick 1)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per timed loop (default 16; --quick 4)")
    p.add_argument("--repeats", type=int, default=2, help="timed loops per run (after one untimed)")
    p.add_argument("--unit_tokens", type=int, default=None, help="tokens of the distinct-units decode (default 64)")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--bandwidth_mb", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny models, 1 round: a smoke test of the harness")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_17b_cpu.json)")
    p.add_argument("--no_plot", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one model in this process
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.tokens = args.tokens or (4 if args.quick else 16)
    args.unit_tokens = args.unit_tokens or (8 if args.quick else 64)
    if args.quick:
        args.bandwidth_mb = min(args.bandwidth_mb, 64)
    args.models = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in args.models if n not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    rows = []
    passthrough = [f"--tokens={args.tokens}", f"--repeats={args.repeats}", f"--unit_tokens={args.unit_tokens}",
                   f"--prompt_len={args.prompt_len}", f"--bandwidth_mb={args.bandwidth_mb}", f"--seed={args.seed}",
                   *(["--quick"] if args.quick else [])]
    for r in range(args.rounds):
        for name in args.models:
            print(f"[round {r + 1}/{args.rounds}] {name} ...", flush=True)
            proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), f"--child={name}",
                                   f"--round={r}", *passthrough], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                raise SystemExit(f"the {name} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            units = row["distinct_units"]
            print(f"  {name}: {row['ms_per_token']:.1f} ms/token, {100 * row['read_bandwidth_fraction']:.0f}% of the "
                  f"read floor ({row['bandwidth']['read_gb_per_s']:.1f} GB/s), peak RSS "
                  f"{row['peak_rss_bytes'] / 2**30:.1f} GiB, build {row['build_s']:.0f} s"
                  + (f", {units['distinct_mean']:.1f} distinct units per block over {units['tokens']} tokens" if units
                     else ""), flush=True)
    summary = summarise(rows, args.models)
    result = {**reporting.run_header("17B unbatched decode, int8 weights"), "settings": vars(args), "paper": PAPER,
              "results": rows, "summary": summary}
    out = pathlib.Path(args.out or RESULTS / f"decode_17b_{machine.machine_kind('cpu')}{'_quick' if args.quick else ''}.json")
    reporting.write_json(out, result)
    print(format_table(summary))
    if not args.no_plot:
        plot(summary, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
