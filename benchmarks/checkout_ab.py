"""Decode latency of two checkouts (A: this one, B: another, e.g. `git worktree add ../old HEAD~1`), one
process each, alternated A B A B, under each CPU set given: a regression check for changes that a single
process cannot compare (two builds of the CPU kernels register the same names). Each run is
`benchmarks/decode_latency.py` of its own checkout, with its own kernels (built beforehand in that checkout:
`python -m scaling_sparse.kernels.build`).

    python benchmarks/checkout_ab.py --b=../old --cpus=0,1 --cpus=0 --rounds=2
    python benchmarks/checkout_ab.py --b=../old --presets=medium_sparse_all --weights=float

Writes benchmarks/results/checkout_ab_cpu.json: per CPU set, preset and weights, the ms/token of every run
of A and of B, their medians and the ratio A/B of the medians and the decode path each took.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and the checkout importable
    sys.path.insert(0, str(ROOT))

from benchmarks import reporting  # noqa: E402


def git_head(checkout: pathlib.Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return done.stdout.strip()[:120] if done.returncode == 0 else "not a git checkout"


def run_decode(checkout: pathlib.Path, cpus: str, args, out_dir: pathlib.Path) -> list[dict]:
    """One decode_latency.py run of `checkout` pinned to `cpus` -> its result rows."""
    cmd = [sys.executable, str(checkout / "benchmarks" / "decode_latency.py"), f"--presets={args.presets}",
           f"--tokens={args.tokens}", f"--repeats={args.repeats}", "--per_call_tokens=8", "--per_call_repeats=1",
           f"--bandwidth_mb={args.bandwidth_mb}", f"--weights={args.weights}", "--no_plot", f"--out_dir={out_dir}"]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"decode_latency.py in {checkout} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads((out_dir / "decode_cpu.json").read_text())
    return result["results"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--b", required=True, help="the other checkout (B, the baseline)")
    p.add_argument("--cpus", action="append", default=None, help="a CPU set for taskset (repeatable; default 0,1)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--presets", default="medium_sparse_all,terraformer_medium,medium_dense")
    p.add_argument("--weights", default="both", choices=("float", "both"))
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth_mb", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkout_ab_cpu.json"))
    args = p.parse_args(argv)
    checkouts = {"A": ROOT, "B": pathlib.Path(args.b).resolve()}
    if not (checkouts["B"] / "benchmarks" / "decode_latency.py").exists():
        p.error(f"--b={args.b}: no benchmarks/decode_latency.py there (give a checkout of this project)")
    runs = []  # {"cpus", "side", "round", "rows"}
    with tempfile.TemporaryDirectory() as tmp:
        for cpus in args.cpus or ["0,1"]:
            for round_ in range(args.rounds):
                for side in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                    print(f"[cpus {cpus}] round {round_ + 1}/{args.rounds}: {side}", flush=True)
                    rows = run_decode(checkouts[side], cpus, args, pathlib.Path(tmp) / f"{side}{cpus}{round_}")
                    runs.append({"cpus": cpus, "side": side, "round": round_, "rows": rows})
    table = []
    for cpus in args.cpus or ["0,1"]:
        by_key = {}  # (label, weights) -> side -> the runs' rows
        for run in (r for r in runs if r["cpus"] == cpus):
            for row in run["rows"]:
                key = (reporting.decode_label(row), row.get("weights", "float"))
                by_key.setdefault(key, {"A": [], "B": []})[run["side"]].append(row)
        for (label, weights), sides in by_key.items():
            ms = {side: [r["ms_per_token"] for r in rows] for side, rows in sides.items()}
            med = {side: statistics.median(v) for side, v in ms.items()}
            table.append({"cpus": cpus, "preset": label, "weights": weights, "ms_per_token_A": ms["A"],
                          "ms_per_token_B": ms["B"], "median_A": med["A"], "median_B": med["B"],
                          "ratio_A_over_B": med["A"] / med["B"], "decode_path_A": sides["A"][0].get("decode_path"),
                          "decode_path_B": sides["B"][0].get("decode_path")})
            print(f"cpus {cpus:5s} {label:22s} {weights:5s}  A {med['A']:8.3f}  B {med['B']:8.3f} ms/token  "
                  f"A/B {med['A'] / med['B']:.3f}", flush=True)
    result = {**reporting.run_header("checkout_ab"), "A": {"path": str(ROOT), "head": git_head(ROOT)},
              "B": {"path": str(checkouts["B"]), "head": git_head(checkouts["B"])},
              "method": "decode_latency.py of each checkout in its own process, pinned with taskset, A and B "
                        "alternated (A B, then B A) for each round; medians over the rounds' loop medians",
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "b")}, "rows": table}
    reporting.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
