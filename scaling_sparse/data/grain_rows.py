"""TFDS text read through Grain: a seeded global order, each process reading only its rows' records, and
a resume that reads nothing it has already used (config.data.tfds_reader="grain").

The records come from TFDS's random-access data source (`builder.as_data_source`, ArrayRecord files),
in the order of `grain.MapDataset.source(...).shuffle(seed).repeat()`: a seeded permutation of the
split, drawn afresh each epoch (Grain's index shuffle: no buffer, any position in O(1)). Global index
i of that order is epoch i // N's (i % N)-th record.

Row streams. Row r of the global batch (of B rows) reads global indices r, r + B, r + 2B, ... and packs
them as tfds_c4.StreamIterator packs the whole split: the documents back to back with eos after each,
windows of L + 1 tokens every L tokens. A process feeds a contiguous block of rows (packing.process_rows)
and so reads 1/P of the records. The global batch depends only on B and the seed, never on the process
count, so a run may resume on another number of processes.

State: for every row, [k, t]: the row's k-th record is the first one its next window uses, from its
t-th token. A resume reads the records from there, never any earlier one, whatever k: constant time.
A process holds only its rows' state; `get_state()` gathers every row's (a collective: every process
calls it at each checkpoint, as train.py does) so the checkpoint holds the whole batch's position.

Tokenization: each refill tokenizes one record for every row that needs one, in one multithreaded
SentencePiece call (Tokenizer.encode_batch). Grain's worker processes are not used: the packer's state
would then be spread over workers' states that depend on the worker count (docs/data.md).
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence

import numpy as np

from scaling_sparse.data import DataError, packing

KIND = "grain_rows"


def open_source(builder, split: str):
    """TFDS's random-access source of a prepared split (ArrayRecord files: tfds_c4.build_data checks the
    copy holds them), or a DataError naming the unreadable files."""
    try:
        return builder.as_data_source(split=split)
    except Exception as e:  # noqa: BLE001 - tfds raises several types for unreadable shards
        raise DataError(f"{builder.info.full_name}: the {split} split's ArrayRecord files cannot be opened ({e}). "
                        f"Fix: check the files under {builder.data_dir}.") from e


def texts_in_order(source) -> Callable[[int], "collections.abc.Iterator[str]"]:
    """-> open(skip): the split's texts in stored order from record `skip` (tokenizer training, validation)."""
    def open_split(skip: int):
        for i in range(skip, len(source)):
            yield _text(source[i])
    return open_split


def _text(record) -> str:
    text = record["text"] if isinstance(record, dict) else record
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


class RowStreamIterator:
    """Infinite iterator of this process's rows of each packed global batch, read through Grain."""

    def __init__(self, source: Sequence, tokenizer, batch_size: int, seq_len: int, *, seed: int,
                 fingerprint: str = "", split: str = "train", process_index: int = 0, process_count: int = 1,
                 gather: Callable[[np.ndarray], np.ndarray] | None = None):
        try:
            import grain
        except ImportError as e:
            raise DataError("config.data.tfds_reader=grain needs Grain. Fix: pip install 'scaling-sparse[c4]' "
                            "(or pip install grain).") from e
        if len(source) == 0:
            raise DataError(f"the {split} split has no records. Fix: check config.data.tfds_name.")
        self.source, self.tokenizer, self.split = source, tokenizer, split
        self.order = grain.MapDataset.source(source).shuffle(seed=seed).repeat()  # global index -> record
        self.batch_size, self.seq_len, self.fingerprint = batch_size, seq_len, fingerprint
        self.rows = range(batch_size)[packing.process_rows(batch_size, process_index, process_count)]
        self.process_count = process_count
        self.gather = gather
        self.records_read = 0  # records this process has read (what "each process reads 1/P" counts)
        self._seek({r: (0, 0) for r in self.rows})

    def _seek(self, positions: dict) -> None:
        # Per row: a deque of [k, tokens] not yet fully used, the tokens of its head already used, the
        # tokens available after them, and the next k to read.
        self._pending = {r: collections.deque() for r in self.rows}
        self._offset = {r: int(positions[r][1]) for r in self.rows}
        self._available = {r: 0 for r in self.rows}
        self._next = {r: int(positions[r][0]) for r in self.rows}

    def _refill(self, rows: list[int]) -> None:
        """Reads and tokenizes the next record of each of `rows` together."""
        indices = [self._next[r] * self.batch_size + r for r in rows]
        texts = [_text(self.order[i]) for i in indices]
        self.records_read += len(texts)
        for r, ids in zip(rows, self.tokenizer.encode_batch(texts)):
            tokens = np.asarray(ids + [self.tokenizer.eos_id], np.int32)
            used = self._offset[r] if not self._pending[r] else 0  # a restored head's used tokens
            self._pending[r].append([self._next[r], tokens])
            self._available[r] += len(tokens) - used
            self._next[r] += 1

    def _window(self, r: int) -> np.ndarray:
        tokens, self._offset[r] = packing.cut_window(self._pending[r], self._offset[r], self.seq_len + 1,
                                                     self.seq_len)
        self._available[r] -= self.seq_len
        return tokens

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            short = [r for r in self.rows if self._available[r] < self.seq_len + 1]
            if not short:
                break
            self._refill(short)
        return packing.make_batch(np.stack([self._window(r) for r in self.rows]))

    def local_state(self) -> np.ndarray:
        """int64 [rows of this process, 2]: each row's [k, t] (the module docstring)."""
        return np.array([[self._pending[r][0][0] if self._pending[r] else self._next[r], self._offset[r]]
                         for r in self.rows], np.int64)

    def get_state(self) -> dict:
        local = self.local_state()
        if self.process_count > 1:
            if self.gather is None:
                raise RuntimeError("a multi-process RowStreamIterator needs `gather` to save every row's position")
            rows = np.asarray(self.gather(local)).reshape(self.batch_size, 2)
        else:
            rows = local
        return {"kind": KIND, "rows": rows.tolist(), "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        packing.check_state(state, kind=KIND, fingerprint=self.fingerprint)
        rows = state.get("rows")
        if not isinstance(rows, list) or len(rows) != self.batch_size:
            raise DataError(f"the saved data position has {len(rows) if isinstance(rows, list) else 'no'} rows, "
                            f"but config.train.batch_size is {self.batch_size}: Grain's row streams cannot be "
                            "re-cut to another batch size. Fix: resume with the batch size the run was saved with.")
        self._seek({r: rows[r] for r in self.rows})


def process_allgather(local: np.ndarray) -> np.ndarray:
    """Every process's rows of `local` (int, [n, 2]), stacked in process order (a JAX collective)."""
    from jax.experimental import multihost_utils

    if np.abs(local).max(initial=0) >= 2**31:
        raise DataError("a data position past 2**31 records per row cannot be gathered as int32")
    return np.asarray(multihost_utils.process_allgather(local.astype(np.int32)), np.int64)
