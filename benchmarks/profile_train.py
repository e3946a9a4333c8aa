"""Where a training step's time goes: XLA ops of the compiled train step, by time per step.

Builds one preset's train step exactly as train_throughput.py does (state builder, make_train_step,
a synthetic random batch; benchmarks/train_throughput.py `StepTimer`), runs it under the JAX
profiler, reads the Perfetto trace, sums each XLA op's time and names it by the JAX operation it
came from (the HLO's op_name metadata) and its result shape, as profile_decode.py does for decoding.
Each op is also put in a pass: forward (`jvp(...)` in its op_name), backward (`transpose(jvp(...))`)
or update (the optimizer, the gradient norm, the metrics). The profiler adds a few microseconds per
op, so the traced total exceeds the untraced step time; the ranking is what to read.

    python benchmarks/profile_train.py                          # stdlib_sparse; JSON under benchmarks/results/
    python benchmarks/profile_train.py --preset=medium_sparse_all --top=30
    python benchmarks/profile_train.py --preset='tiny[ff_sparsity=8]' --steps=2
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from benchmarks import machine, reporting  # noqa: E402
from benchmarks.profile_decode import _WRAPPERS  # noqa: E402
from benchmarks.train_throughput import StepTimer, bench_config  # noqa: E402
from scaling_sparse.config import ConfigError  # noqa: E402


def op_origins(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """HLO instruction name -> (JAX operation it came from, result shape, pass). The operation is the
    op_name metadata without the outer `jit(train_step)/`; the pass is forward, backward or update
    (see the module docstring), "unknown" where XLA left no metadata."""
    origins = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+) ", line)
        if not m:
            continue
        shape = re.sub(r"\{[^}]*\}", "", m.group(2))  # drop the layout
        op = re.search(r'op_name="([^"]+)"', line)
        if not op:
            origins[m.group(1)] = ("", shape, "unknown")
            continue
        name = op.group(1)
        stage = "backward" if "transpose(jvp" in name else "forward" if "jvp(" in name else "update"
        origins[m.group(1)] = (re.sub(r"^jit\([^)]*\)/", "", name), shape, stage)
    return origins


def op_kind(name: str) -> str:
    """An HLO instruction's kind: per-layer copies fusion.3, fusion.7 and cond.7.clone -> fusion, cond."""
    return re.sub(r"\.(\d+|clone)(?=\.|$)", "", name)


def summarize(events: list[dict], origins: dict, steps: int) -> dict:
    """Trace events -> ranked rows: per (JAX operation, result shape, op kind), the time per step,
    its share and calls per step; and the totals per pass and per op kind."""
    by_op, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("dur") is not None and not e["name"].startswith(_WRAPPERS):
            by_op[e["name"]] += e["dur"]
            count[e["name"]] += 1
    by_row, calls, stage_of = collections.Counter(), collections.Counter(), {}
    by_stage, by_kind = collections.Counter(), collections.Counter()
    for name, us in by_op.items():
        kind = op_kind(name)
        origin, shape, stage = origins.get(name, ("", "", "unknown"))
        row = f"{origin} {shape} [{kind}]" if origin else f"{shape} [{kind}]" if shape else kind
        by_row[row] += us / steps
        calls[row] += count[name] / steps
        stage_of[row] = stage
        by_stage[stage] += us / steps
        by_kind[kind] += us / steps
    total = sum(by_row.values())
    rows = [{"op": row, "pass": stage_of[row], "ms_per_step": us / 1e3, "share": us / total,
             "calls_per_step": calls[row]} for row, us in by_row.most_common()]
    share = lambda counter: [{"name": k, "ms_per_step": us / 1e3, "share": us / total}  # noqa: E731
                             for k, us in counter.most_common()]
    return {"traced_ms_per_step": total / 1e3, "by_pass": share(by_stage), "by_kind": share(by_kind), "ops": rows}


def profile(spec: str, args) -> dict:
    kind = machine.machine_kind()
    try:
        config, base, overrides = bench_config(spec, args, kind)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    timer = StepTimer(spec, config, base=base, overrides=overrides)
    timer.materialize(warmup=2, seed=args.seed)  # compiled above; two untimed steps warm it up
    for _ in range(args.steps):
        timer.step_once()  # untraced reference times
    untraced = statistics.median(timer.times)
    origins = op_origins(timer.compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(args.steps):
            timer.step_once()
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    result = summarize(events, origins, args.steps)
    timer.release()
    return {"preset": spec, "n_layers": config.model.n_layers, "dtype": config.model.dtype,
            "param_dtype": config.model.param_dtype, "batch_size": timer.batch_size, "seq_len": timer.seq_len,
            "steps": args.steps, "untraced_ms_per_step": untraced, **result}


def format_profile(result: dict, top: int) -> str:
    lines = [f"{result['preset']} ({result['n_layers']} layers, {result['dtype']}, batch {result['batch_size']} x "
             f"{result['seq_len']}): {result['traced_ms_per_step']:.1f} ms per step under the profiler, "
             f"{result['untraced_ms_per_step']:.1f} ms without",
             "by pass: " + ", ".join(f"{p['name']} {100 * p['share']:.0f}%" for p in result["by_pass"]),
             "by op kind: " + ", ".join(f"{p['name']} {100 * p['share']:.0f}%" for p in result["by_kind"][:8]),
             f"{'ms/step':>9} {'share':>6} {'calls':>6} {'pass':>9}  op (JAX operation, result shape, [XLA op kind])"]
    for row in result["ops"][:top]:
        lines.append(f"{row['ms_per_step']:9.2f} {100 * row['share']:5.1f}% {row['calls_per_step']:6.1f} "
                     f"{row['pass']:>9}  {row['op'][:110]}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="stdlib_sparse", help="a preset, config path or NAME[field=value,...]")
    p.add_argument("--steps", type=int, default=3, help="traced steps (the figures are per step)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--param_dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch_size", type=int, default=None, help="default: as train_throughput.py")
    p.add_argument("--seq_len", type=int, default=None)
    p.add_argument("--medium_batch", type=int, default=None, help="medium/large presets (CPU 1, GPU 8)")
    p.add_argument("--medium_seq", type=int, default=None, help="medium/large presets (CPU 128, GPU 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=25, help="rows to print")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_profile_<kind>.json)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    backend = jax.default_backend()
    args.dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    result = profile(args.preset, args)
    result["machine"] = machine.machine_info()
    print(format_profile(result, args.top))
    out = args.out or ROOT / "benchmarks" / "results" / f"train_profile_{machine.machine_kind(backend)}.json"
    reporting.write_json(out, result)
    return result


if __name__ == "__main__":
    main()
