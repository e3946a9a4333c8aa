"""How much TRIME_ext's BM25 batches let a window copy its targets from the other windows of its batch
(docs/trime.md, "TrimeLM_ext < kNN-LM: does not hold").

A target at position t >= 4 of a window is "copyable" when the 5-gram ending at it (its 4 preceding tokens
and itself) occurs in another window of the batch: in-batch memory then holds the answer after the same
context. Compared on the same windows grouped by BM25 (the cached grouping a TRIME_ext run made,
WORKDIR/data_cache/*.bm25-b{B}-l{L}-s{seed}.npy) and in a random order; also exact duplicate windows and
near duplicates (more than 80% of a window's 5-grams shared with one other window of the batch).

    python benchmarks/ext_batch_overlap.py --workdir=workdirs/memory_lm/sparse-s0-ext
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.machine import machine_info  # noqa: E402


def overlap(stream: np.ndarray, order: np.ndarray, batch_size: int, seq_len: int, batches: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    groups = order[: len(order) // batch_size * batch_size].reshape(-1, batch_size)
    copyable, exact, near = [], 0, 0
    for group in groups[rng.choice(len(groups), min(batches, len(groups)), replace=False)]:
        windows = [np.asarray(stream[i * seq_len: i * seq_len + seq_len + 1]) for i in group]
        grams = [set(map(tuple, np.lib.stride_tricks.sliding_window_view(w, 5))) for w in windows]
        for j, window in enumerate(windows):
            others = set().union(*(g for k, g in enumerate(grams) if k != j))
            own = np.lib.stride_tricks.sliding_window_view(window, 5)
            copyable.append(float(np.mean([tuple(g) in others for g in own])))
            exact += any(np.array_equal(window, windows[k]) for k in range(len(windows)) if k != j)
            near += max(len(grams[j] & grams[k]) / len(grams[j]) for k in range(len(windows)) if k != j) > 0.8
    n = len(copyable)
    return {"windows": n, "copyable_target_share": float(np.mean(copyable)),
            "windows_more_than_half_copyable": float(np.mean(np.asarray(copyable) > 0.5)),
            "exact_duplicate_windows": exact / n, "near_duplicate_windows": near / n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a TRIME_ext run's workdir (its data_cache holds the grouping)")
    p.add_argument("--batches", type=int, default=400, help="batches sampled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/ext_batch_overlap_cpu.json")
    args = p.parse_args(argv)
    cache = pathlib.Path(args.workdir) / "data_cache"
    groupings = sorted(cache.glob("*.bm25-b*-l*-s*.npy"))
    if not groupings:
        p.error(f"no BM25 grouping in {cache}: give the workdir of a train.trime.memory=ext run with BM25 batches")
    grouping = groupings[0]
    batch_size, seq_len = map(int, re.search(r"\.bm25-b(\d+)-l(\d+)-s\d+\.npy$", grouping.name).groups())
    stream = np.load(cache / (grouping.name.split(".bm25-")[0] + ".train.npy"), mmap_mode="r")
    order = np.load(grouping)
    shuffled = np.random.default_rng(args.seed).permutation(len(order))
    result = {"benchmark": "ext_batch_overlap", "machine": machine_info(), "grouping": grouping.name,
              "batch_size": batch_size, "seq_len": seq_len, "batches_sampled": args.batches,
              "bm25": overlap(stream, order, batch_size, seq_len, args.batches, args.seed),
              "random": overlap(stream, shuffled, batch_size, seq_len, args.batches, args.seed)}
    for kind in ("bm25", "random"):
        r = result[kind]
        print(f"{kind:>6}: copyable targets {r['copyable_target_share']:.1%}, windows over half copyable "
              f"{r['windows_more_than_half_copyable']:.1%}, exact duplicates {r['exact_duplicate_windows']:.2%}, "
              f"near duplicates {r['near_duplicate_windows']:.2%} ({r['windows']} windows)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
