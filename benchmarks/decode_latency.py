"""Unbatched per-token decode latency of dense vs sparse presets (the paper's decode benchmark).

For each preset: random weights (latency needs no training) from the state builder, built directly
in the decode dtype (set-up: decode_setup.py, models.py), batch 1, a 16-token prompt (prefill), then T
tokens decoded greedily inside one jitted loop with the caches (scaling_sparse.decode.Decoder.loop),
timed over several repeats after compilation and warm-up (decode_timing.py); and the same tokens again with one Python
call per token (Decoder.step), which is what an interactive user sees. Every figure is read against
the memory bandwidth measured in the same run (unbatched decoding is memory-bound: the floor per
token is weight bytes read / bandwidth).

  python benchmarks/decode_latency.py                      # medium presets, ~10 min on 2 CPU cores
  python benchmarks/decode_latency.py --quick --presets=medium_dense,medium_sparse_all
  python benchmarks/decode_latency.py --presets=large_dense,large_sparse --large_layers=2

Writes benchmarks/results/decode_{cpu,gpu}.json and .png and prints a table (benchmarks/reporting.py).
--paper_rows times the reference's encoder-decoder rows instead (paper_rows.py).
CPU runs in float32, GPU runs in bfloat16 (--dtype overrides). Method: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and the checkout importable
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from benchmarks import machine, models, paper_rows, reporting  # noqa: E402
from benchmarks.decode_setup import fits_together, int8_twin, jax_path_twin, prepare_preset, time_presets  # noqa: E402
from scaling_sparse.config import ConfigError, load_config  # noqa: E402
from scaling_sparse.kernels import cpu as cpu_kernels  # noqa: E402

DEFAULT_PRESETS = ("medium_dense", "medium_sparse_ff", "medium_sparse_qkv", "medium_sparse_ffqkv",
                   "medium_sparse_all", "terraformer_medium")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="",
                   help="comma-separated preset names or config paths (default: the medium presets "
                        "and terraformer_medium)")
    p.add_argument("--tokens", type=int, default=None, help="tokens decoded per timed loop (default 64)")
    p.add_argument("--prompt_len", type=int, default=16, help="prompt length for the prefill")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of each loop (default 5)")
    p.add_argument("--per_call_tokens", type=int, default=None, help="tokens in the per-call mode (default 32)")
    p.add_argument("--per_call_repeats", type=int, default=1, help="passes over the per-call tokens")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights and compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--large_layers", type=int, default=None,
                   help="blocks to time of a large_* (17B-width) preset (default: 2 on CPU; on GPU all that fit)")
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no_plot", action="store_true", help="skip the matplotlib plot")
    p.add_argument("--quick", action="store_true",
                   help="a fast development run: 16 tokens, 2 repeats, 8 per-call tokens, small bandwidth probe")
    p.add_argument("--bandwidth_mb", type=int, default=None,
                   help="array size of the bandwidth probe in MiB (default 1024 on CPU, 4096 on GPU, 256 quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--xla_flags", default="",
                   help="XLA flags for this run (e.g. --xla_cpu_multi_thread_eigen=false), added to XLA_FLAGS before "
                        "JAX starts and recorded in the JSON (settings.xla_flags); none by default: on the 2-core "
                        "CPU that flag with --xla_cpu_enable_concurrency_optimized_scheduler=false made dense and "
                        "sparse decoding slower (docs/benchmarks.md)")
    p.add_argument("--cpu_kernels", choices=("auto", "off", "compare"), default="auto",
                   help="the compiled CPU decode kernels of the sparse layers (docs/kernels.md): auto (default) "
                        "uses them where the Decoder does (CPU backend, library built); off: the pure-JAX path; "
                        "compare: each preset that uses them is timed on the pure-JAX path too, same weights, "
                        "same run (rows with decode_path \"jax\")")
    p.add_argument("--weights", choices=("float", "both"), default=None,
                   help="both (default with float32): each preset is also decoded with its weights quantised to "
                        "int8 (docs/quantization.md), same run, interleaved (rows labelled @int8); float (default "
                        "with bfloat16 and for --paper_rows): the --dtype weights only")
    p.add_argument("--sequential", action="store_true",
                   help="time one preset at a time even when all fit memory (default: interleave the repeats)")
    p.add_argument("--paper_rows", action="store_true",
                   help="the paper's rows instead of --presets: the reference's encoder-decoders (800M dense vs "
                        "Sparse FF+QKV, the Terraformer; the 17B slices), speedups within each pair; writes "
                        "decode_paper_{cpu,gpu}.json")
    p.add_argument("--paper_groups", default=",".join(paper_rows.PAPER_GROUPS),
                   help=f"with --paper_rows: which groups ({', '.join(paper_rows.PAPER_GROUPS)}); the file keeps "
                        "the other groups of an earlier run")
    args = p.parse_args(argv)
    args.paper_groups = [g.strip() for g in args.paper_groups.split(",") if g.strip()]
    unknown = [g for g in args.paper_groups if g not in paper_rows.PAPER_GROUPS]
    if unknown:
        p.error(f"--paper_groups: unknown {', '.join(unknown)} (known: {', '.join(paper_rows.PAPER_GROUPS)})")
    if args.paper_rows and args.weights == "both":
        p.error("--paper_rows times the reference's float models: leave out --weights")
    if args.dtype == "bfloat16" and args.weights == "both":
        p.error("--weights=both quantises float32 weights: use --dtype=float32 or --weights=float")
    if args.paper_rows and args.cpu_kernels == "compare":
        p.error("--cpu_kernels=compare times --presets: the paper rows take auto or off")
    if args.paper_rows and args.presets:
        p.error("--paper_rows times its own presets: leave out --presets")
    quick = args.quick
    defaults = {"tokens": (16, 64), "repeats": (2, 5), "per_call_tokens": (8, 32)}  # (quick, full)
    for name, (fast, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, fast if quick else full)
    for name in ("tokens", "prompt_len", "repeats", "per_call_tokens", "per_call_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.bandwidth_mb is not None and args.bandwidth_mb < 1:
        p.error(f"--bandwidth_mb must be >= 1, got {args.bandwidth_mb}")
    if args.large_layers is not None and args.large_layers < 1:
        p.error(f"--large_layers must be >= 1, got {args.large_layers}")
    return args


def resolve_presets(spec: str) -> list[str]:
    """The presets to time; an unknown one fails before any timing, naming the known ones."""
    names = [n.strip() for n in spec.split(",") if n.strip()] or list(DEFAULT_PRESETS)
    for n in names:
        load_config(n)
    return names


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.xla_flags and args.xla_flags not in os.environ.get("XLA_FLAGS", ""):
        raise SystemExit("--xla_flags is read when JAX starts: give it on this script's command line "
                         "(python benchmarks/decode_latency.py --xla_flags=...), or set XLA_FLAGS yourself")
    backend = jax.default_backend()
    args.dtype_forced = args.dtype is not None
    args.dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    args.weights = args.weights or ("both" if args.dtype == "float32" and not args.paper_rows else "float")
    try:
        presets = [] if args.paper_rows else resolve_presets(args.presets)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    info = machine.machine_info()
    capacity = info.get("device_memory_bytes") or info["host_memory_bytes"]
    print(f"device: {', '.join(info['devices'])} | {info['cpu_count']} CPU cores | dtype {args.dtype} | "
          f"prompt {args.prompt_len}, {args.tokens} tokens x {args.repeats} repeats", flush=True)

    probe_mb = args.bandwidth_mb or (256 if args.quick else 1024 if backend == "cpu" else 4096)
    probe = probe_mb << 20
    bandwidth = machine.measure_bandwidth(probe, repeats=5 if args.quick else 10)
    print(f"memory bandwidth: {bandwidth['gb_per_s']:.1f} GB/s copy, {bandwidth['read_gb_per_s']:.1f} GB/s read",
          flush=True)

    if args.paper_rows:
        return paper_rows.main_paper_rows(args, info, backend, bandwidth)
    interleave = fits_together(presets, args, capacity) and not args.sequential
    print(f"schedule: {'repeats interleaved across presets' if interleave else 'one preset at a time'}", flush=True)

    results, prepared = [], []
    for name in presets:
        print(f"preparing {name} ...", flush=True)
        meta, timer = prepare_preset(name, args, backend=backend, capacity_bytes=capacity)
        pair = [(meta, timer)]
        if args.cpu_kernels == "compare":
            pair += [twin] if (twin := jax_path_twin(name, meta, timer, args)) else []
        if args.weights == "both":
            pair.append(int8_twin(name, meta, timer, args))
        if interleave:
            prepared += pair
            continue
        results += time_presets(pair, args, bandwidth)
        del timer, pair
        gc.collect()
    if interleave:
        print(f"timing {len(prepared)} presets, {args.repeats} interleaved repeats ...", flush=True)
        results += time_presets(prepared, args, bandwidth)
    reporting.add_speedups(results)

    print(reporting.format_decode_table(results, bandwidth))
    kind = machine.machine_kind(backend)
    out_dir = pathlib.Path(args.out_dir)
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "dtype_forced", "paper_rows",
                                                                  "paper_groups")}
    report = {
        **reporting.run_header("unbatched greedy decode latency", info),
        "bandwidth": bandwidth,
        "settings": {**settings, "init": models.INIT, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "cpu_kernels_status": cpu_kernels.status()},
        "schedule": "interleaved" if interleave else "sequential",
        "results": results,
    }
    reporting.write_json(out_dir / f"decode_{kind}.json", report)
    if not args.no_plot:
        reporting.plot_decode(results, out_dir / f"decode_{kind}.png",
                              f"{', '.join(info['devices'])}, {args.dtype}, batch 1, "
                              f"{args.tokens} tokens after a {args.prompt_len}-token prompt")
    return report


# XLA's CPU dots upcast bfloat16 weights to float32 copies. Its concurrency-optimized scheduler (the
# default) makes every copy of a program at once, before the dots: the 17B slices' prefill would hold
# 17 GB of copies beside 9 GB of weights; and while-loop invariant code motion hoists the copies out of
# the jitted decode loop (12.5 GB, and the loop would then read float32 copies, not the bfloat16
# weights). With both off a program converts one weight at a time, per token (temporaries 1.5-2.4 GB).
# Set for every --paper_rows process, before JAX starts; recorded in the JSON (settings.xla_flags).
PAPER_ROWS_XLA_FLAG = ("--xla_cpu_enable_concurrency_optimized_scheduler=false "
                       "--xla_disable_hlo_passes=while-loop-invariant-code-motion")


def xla_flags_from_argv(argv: list[str]) -> str:
    """The --xla_flags value on a command line ('' if absent), read before argparse: XLA parses
    XLA_FLAGS when JAX starts its backend, which main() does first."""
    for i, arg in enumerate(argv):
        if arg.startswith("--xla_flags="):
            return arg.split("=", 1)[1]
        if arg == "--xla_flags" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


if __name__ == "__main__":
    if xla_flags_from_argv(sys.argv[1:]):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags_from_argv(sys.argv[1:])}".strip()
    if "--paper_rows" in sys.argv[1:]:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {PAPER_ROWS_XLA_FLAG}".strip()
    main()
