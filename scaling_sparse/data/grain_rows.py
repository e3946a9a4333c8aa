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

Groups of consecutive rows (TRIME_long on TFDS, `group_rows` G > 1; docs/trime.md "Batching"): the B / G
streams are the groups' (stream s reads global indices s, s + B/G, ...), and each step stream s gives its
G next windows to rows sG, ..., sG + G - 1 in order: row i + 1 continues row i, and the group's next step
continues its last row, as data/consecutive.py does for the local corpora. A process's block of rows must
hold whole groups. G = 1 is the plain row streams above.

State: for every stream, [k, t]: the stream's k-th record is the first one its next window uses, from its
t-th token. A resume reads the records from there, never any earlier one, whatever k: constant time.
A process holds only its streams' state; `get_state()` gathers every stream's (a collective: every process
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
                 gather: Callable[[np.ndarray], np.ndarray] | None = None, group_rows: int = 1):
        try:
            import grain
        except ImportError as e:
            raise DataError("config.data.tfds_reader=grain needs Grain. Fix: pip install 'scaling-sparse[c4]' "
                            "(or pip install grain).") from e
        if len(source) == 0:
            raise DataError(f"the {split} split has no records. Fix: check config.data.tfds_name.")
        if group_rows < 1 or batch_size % group_rows:
            raise DataError(f"train.batch_size {batch_size} is not a whole number of TRIME_long groups of "
                            f"train.trime.group_rows={group_rows} rows. Fix: a group size dividing the batch")
        self.source, self.tokenizer, self.split = source, tokenizer, split
        self.order = grain.MapDataset.source(source).shuffle(seed=seed).repeat()  # global index -> record
        self.batch_size, self.seq_len, self.fingerprint = batch_size, seq_len, fingerprint
        self.group_rows, self.stream_count = group_rows, batch_size // group_rows
        rows = range(batch_size)[packing.process_rows(batch_size, process_index, process_count)]
        if len(rows) % group_rows:
            raise DataError(f"each of the {process_count} processes feeds {len(rows)} rows of the batch, not whole "
                            f"TRIME_long groups of train.trime.group_rows={group_rows}. Fix: a group size dividing "
                            f"{len(rows)}, or a batch size that gives each process whole groups")
        self.streams = range(rows.start // group_rows, rows.stop // group_rows)
        self.process_count = process_count
        self.gather = gather
        self.records_read = 0  # records this process has read (what "each process reads 1/P" counts)
        self._seek({s: (0, 0) for s in self.streams})

    def _seek(self, positions: dict) -> None:
        # Per stream: a deque of [k, tokens] not yet fully used, the tokens of its head already used, the
        # tokens available after them, and the next k to read.
        self._pending = {s: collections.deque() for s in self.streams}
        self._offset = {s: int(positions[s][1]) for s in self.streams}
        self._available = {s: 0 for s in self.streams}
        self._next = {s: int(positions[s][0]) for s in self.streams}

    def _refill(self, streams: list[int]) -> None:
        """Reads and tokenizes the next record of each of `streams` together."""
        indices = [self._next[s] * self.stream_count + s for s in streams]
        texts = [_text(self.order[i]) for i in indices]
        self.records_read += len(texts)
        for s, ids in zip(streams, self.tokenizer.encode_batch(texts)):
            tokens = np.asarray(ids + [self.tokenizer.eos_id], np.int32)
            used = self._offset[s] if not self._pending[s] else 0  # a restored head's used tokens
            self._pending[s].append([self._next[s], tokens])
            self._available[s] += len(tokens) - used
            self._next[s] += 1

    def _window(self, s: int) -> np.ndarray:
        tokens, self._offset[s] = packing.cut_window(self._pending[s], self._offset[s], self.seq_len + 1,
                                                     self.seq_len)
        self._available[s] -= self.seq_len
        return tokens

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        need = self.group_rows * self.seq_len + 1  # G windows of L + 1 tokens, each L after the last
        while True:
            short = [s for s in self.streams if self._available[s] < need]
            if not short:
                break
            self._refill(short)
        return packing.make_batch(np.stack([self._window(s) for s in self.streams for _ in range(self.group_rows)]))

    def local_state(self) -> np.ndarray:
        """int64 [streams of this process, 2]: each stream's [k, t] (the module docstring)."""
        return np.array([[self._pending[s][0][0] if self._pending[s] else self._next[s], self._offset[s]]
                         for s in self.streams], np.int64)

    def get_state(self) -> dict:
        local = self.local_state()
        if self.process_count > 1:
            if self.gather is None:
                raise RuntimeError("a multi-process RowStreamIterator needs `gather` to save every stream's position")
            streams = np.asarray(self.gather(local)).reshape(self.stream_count, 2)
        else:
            streams = local
        # "rows": each stream's position (one stream per row when group_rows is 1, as states before groups).
        return {"kind": KIND, "rows": streams.tolist(), "group_rows": self.group_rows, "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        packing.check_state(state, kind=KIND, fingerprint=self.fingerprint)
        streams, group_rows = state.get("rows"), state.get("group_rows", 1)
        if group_rows != self.group_rows:
            raise DataError(f"the saved data position is of groups of {group_rows} consecutive rows, but this run "
                            f"asks for train.trime.group_rows={self.group_rows} (1 without TRIME_long). Fix: resume "
                            f"with --config.train.trime.group_rows={group_rows} and the memory the run was saved with.")
        if not isinstance(streams, list) or len(streams) != self.stream_count:
            raise DataError(f"the saved data position has {len(streams) if isinstance(streams, list) else 'no'} "
                            f"streams, but config.train.batch_size {self.batch_size} makes {self.stream_count}: "
                            "Grain's row streams cannot be re-cut to another batch size. Fix: resume with the batch "
                            "size the run was saved with.")
        self._seek({s: streams[s] for s in self.streams})


def process_allgather(local: np.ndarray) -> np.ndarray:
    """Every process's rows of `local` (int, [n, 2]), stacked in process order (a JAX collective)."""
    from jax.experimental import multihost_utils

    if np.abs(local).max(initial=0) >= 2**31:
        raise DataError("a data position past 2**31 records per row cannot be gathered as int32")
    return np.asarray(multihost_utils.process_allgather(local.astype(np.int32)), np.int64)
