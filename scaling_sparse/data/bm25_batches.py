"""Batches of lexically similar segments for TRIME_ext (train.trime.memory=ext with
train.trime.ext_batching=bm25; docs/trime.md "Batching").

In TRIME_ext every other segment of the batch is memory, which helps when the batch holds related text.
The reference groups segments with BM25 (Pyserini): each segment is a query, its top hits are chained
greedily into batches. Here the BM25 is `bm25s` (pure Python, sparse matrices) over the training stream's
windows (L + 1 tokens every L, as packing.py), with token ids as terms. Grouping: windows are visited in
a seeded order; an unvisited window starts a batch, which takes its unvisited top hits, then theirs,
until it holds B windows (filled from the visiting order if the hits run out). The order of windows is
computed once and cached in WORKDIR/data_cache (local.py); each epoch visits the batches in a new
seeded order, each batch keeping its windows. State {"epoch", "position"} (batches taken this epoch),
the same in every process; a process gathers only its rows.
"""

from __future__ import annotations

import numpy as np

from scaling_sparse.data import DataError
from scaling_sparse.data.packing import check_state, make_batch, process_rows

KIND = "bm25"
HITS = 32  # top hits retrieved per window


def group_windows(stream: np.ndarray, seq_len: int, batch_size: int, seed: int, progress: bool = False) -> np.ndarray:
    """int64 [batches * batch_size]: window indices, each run of batch_size a BM25 group."""
    try:
        import bm25s
    except ImportError as e:
        raise DataError("train.trime.ext_batching=bm25 needs bm25s. Fix: pip install 'scaling-sparse[trime]' "
                        "(or bm25s), or set --config.train.trime.ext_batching=random") from e
    n = (len(stream) - 1) // seq_len
    if n < batch_size:
        raise DataError(f"the training split has {n} windows, fewer than one batch of {batch_size}. Fix: add text")
    terms, dense = np.unique(stream, return_inverse=True)  # bm25s wants term ids 0..V-1
    ids = [dense[i * seq_len: i * seq_len + seq_len + 1].astype(np.int64).tolist() for i in range(n)]
    vocab = {str(t): i for i, t in enumerate(terms.tolist())}
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenization.Tokenized(ids=ids, vocab=vocab), show_progress=progress)
    hits, _ = retriever.retrieve(bm25s.tokenization.Tokenized(ids=ids, vocab=vocab), k=min(HITS, n),
                                 show_progress=progress)
    visited = np.zeros(n, bool)
    visit = np.random.default_rng(seed).permutation(n)
    order, cursor = [], 0
    for start in visit:
        if visited[start]:
            continue
        group, frontier = [start], [start]
        visited[start] = True
        while frontier and len(group) < batch_size:  # its hits, then their hits
            nxt = []
            for w in frontier:
                for h in hits[w]:
                    if len(group) == batch_size:
                        break
                    if not visited[h]:
                        visited[h] = True
                        group.append(int(h))
                        nxt.append(int(h))
            frontier = nxt
        while len(group) < batch_size and cursor < n:  # hits ran out: the next unvisited in visiting order
            w = visit[cursor]
            cursor += 1
            if not visited[w]:
                visited[w] = True
                group.append(int(w))
        if len(group) == batch_size:
            order.extend(group)
    return np.asarray(order, np.int64)


class BM25Iterator:
    def __init__(self, stream: np.ndarray, order: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 fingerprint: str = "", process_index: int = 0, process_count: int = 1):
        if len(order) < batch_size or len(order) % batch_size:
            raise DataError(f"the BM25 grouping holds {len(order)} windows, not whole batches of {batch_size}. "
                            "Fix: delete WORKDIR/data_cache/*bm25* to regroup")
        self.stream, self.order, self.batch_size, self.seq_len, self.seed = stream, order, batch_size, seq_len, seed
        self.fingerprint = fingerprint
        self.rows = process_rows(batch_size, process_index, process_count)
        self.batches = len(order) // batch_size
        self.n_windows = len(order)
        self.epoch, self.position = 0, 0
        self._plan_epoch, self._plan = None, None

    def _batch_order(self) -> np.ndarray:
        if self._plan_epoch != self.epoch:
            self._plan_epoch = self.epoch
            self._plan = np.random.default_rng([self.seed, self.epoch]).permutation(self.batches)
        return self._plan

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        group = self._batch_order()[self.position]
        windows = self.order[group * self.batch_size: (group + 1) * self.batch_size]
        self.position += 1
        if self.position == self.batches:
            self.epoch, self.position = self.epoch + 1, 0
        idx = windows[self.rows, None] * self.seq_len + np.arange(self.seq_len + 1)
        return make_batch(self.stream[idx])

    def get_state(self) -> dict:
        return {"kind": KIND, "epoch": self.epoch, "position": self.position, "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        check_state(state, kind=KIND, fingerprint=self.fingerprint)
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches:
            raise DataError(f"iterator state epoch={epoch} position={position} is out of range for {self.batches} "
                            "BM25 batches. Fix: resume with the data config of the checkpoint.")
        self.epoch, self.position = epoch, position
