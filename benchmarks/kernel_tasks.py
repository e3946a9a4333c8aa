"""How many tasks the CPU decode kernels split their work into (kernels/cpu.py PARTS): an A/B of the
same weights decoded with the kernels traced at several task counts, in one process, repeats
interleaved (issue 31 part 4: kernels that use a many-core host's cores).

A larger fixed count would let a many-core host use more cores while the results stay independent of the
thread count (the split fixes the order of the partial sums). On a small machine the question is what
more, smaller tasks cost: run it under `taskset` with 1 and with 2 cores. Findings so far in
docs/kernels.md ("Task count").

    taskset -c 0,1 python benchmarks/kernel_tasks.py --counts=2,4,8,16
    taskset -c 0   python benchmarks/kernel_tasks.py --counts=2,16
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and the checkout importable
    sys.path.insert(0, str(ROOT))

from benchmarks import machine, reporting  # noqa: E402
from benchmarks.decode_setup import prepare_preset  # noqa: E402
from benchmarks.decode_timing import run_timers  # noqa: E402
from scaling_sparse.kernels import cpu  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="medium_sparse_all,terraformer_medium,medium_dense")
    p.add_argument("--counts", default="2,16", help="task counts to compare")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if not cpu.available():
        raise SystemExit(f"the CPU kernels are not loaded: {cpu.status()['reason']}")
    cores = len(os.sched_getaffinity(0))
    setup = argparse.Namespace(prompt_len=16, tokens=args.tokens, per_call_tokens=8, per_call_repeats=1,
                               repeats=args.repeats, seed=0, dtype="float32", large_layers=None, cpu_kernels="auto")
    pairs = []
    for preset in args.presets.split(","):
        for count in (int(c) for c in args.counts.split(",")):
            cpu.PARTS = count  # read when the decode step is traced (prepare_preset compiles it)
            meta, timer = prepare_preset(preset, setup, backend="cpu", capacity_bytes=machine.host_memory_bytes())
            pairs.append(({"preset": preset, "tasks": count, "targets": meta["cpu_kernel_targets"]}, timer))
            print(f"prepared {preset} with {count} tasks ({meta['cpu_kernel_targets']})", flush=True)
    run_timers([timer for _, timer in pairs], setup)
    rows = []
    for meta, timer in pairs:
        ms = sorted(timer.loop)  # ms per token of each timed loop
        rows.append({**meta, "ms_per_token_median": statistics.median(ms), "ms_per_token_min": ms[0],
                     "ms_per_token": ms})
        print(f"{meta['preset']:20s} tasks {meta['tasks']:3d}: {statistics.median(ms):7.3f} ms/token "
              f"(min {ms[0]:.3f}, {len(ms)} repeats)", flush=True)
    for preset in args.presets.split(","):  # greedy tokens of the two task counts (sums in another order)
        tokens = [timer.loop_tokens for meta, timer in pairs if meta["preset"] == preset]
        agree = float((tokens[0] == tokens[-1]).mean())
        for row in rows:
            if row["preset"] == preset:
                row["greedy_tokens_agree_across_counts"] = agree
    result = {**reporting.run_header("kernel_tasks"), "cores": cores, "tokens": args.tokens,
              "method": "one process, the same weights, the decode loop of `tokens` tokens timed `repeats` times "
                        "round-robin over all (preset, task count) pairs", "rows": rows}
    reporting.write_json(pathlib.Path(args.out_dir) / f"kernel_tasks_cpu_{cores}cores.json", result)
    return result


if __name__ == "__main__":
    main()
