"""Batches of consecutive segments for TRIME_long (train.trime.memory=long; docs/trime.md "Batching").

The training stream's windows (L + 1 tokens every L, as packing.py) are cut into B / G equal contiguous
regions, one per group of G rows. At each step group j takes the next G windows of its region in corpus
order, one per row, so row i + 1 continues row i and the group's next step continues its last row: the
memory of TRIME_long (every earlier row of the group, trime_loss.batch_visibility) is the text just
before. No shuffling of the segment order (the reference's "no shuffling within a stream"); each epoch
restarts the regions at a seeded offset of the window grid. State: {"epoch", "position"} (windows taken
per group this epoch), the same in every process; a process gathers only its rows.
"""

from __future__ import annotations

import numpy as np

from scaling_sparse.data import DataError
from scaling_sparse.data.packing import check_state, make_batch, process_rows

KIND = "consecutive"


class ConsecutiveIterator:
    def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int, group_rows: int, seed: int,
                 fingerprint: str = "", process_index: int = 0, process_count: int = 1):
        if group_rows < 1 or batch_size % group_rows:
            raise DataError(f"train.batch_size {batch_size} is not a whole number of TRIME_long groups of "
                            f"train.trime.group_rows={group_rows} rows. Fix: a group size dividing the batch")
        self.stream, self.batch_size, self.seq_len, self.group_rows, self.seed = (stream, batch_size, seq_len,
                                                                                  group_rows, seed)
        self.fingerprint = fingerprint
        self.rows = process_rows(batch_size, process_index, process_count)
        self.groups = batch_size // group_rows
        n_windows = (len(stream) - 1) // seq_len
        self.region = n_windows // self.groups  # windows per group per epoch
        self.steps_per_epoch = self.region // group_rows
        if self.steps_per_epoch < 1:
            raise DataError(f"the training split has {n_windows} windows of {seq_len + 1} tokens, fewer than one step "
                            f"of {self.groups} groups x {group_rows} consecutive rows. Fix: add text, or lower "
                            "train.batch_size or train.seq_len")
        self._slack = len(stream) - 1 - self.groups * self.region * seq_len
        self.epoch, self.position = 0, 0

    def _offset(self, epoch: int) -> int:
        return int(np.random.default_rng([self.seed, epoch]).integers(0, self._slack + 1)) if epoch else 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        offset = self._offset(self.epoch)
        groups = np.arange(self.groups)[:, None]
        windows = groups * self.region + self.position + np.arange(self.group_rows)[None, :]  # [groups, G]
        starts = offset + windows.reshape(-1) * self.seq_len
        self.position += self.group_rows
        if self.position + self.group_rows > self.region:
            self.epoch, self.position = self.epoch + 1, 0
        idx = starts[self.rows, None] + np.arange(self.seq_len + 1)
        return make_batch(self.stream[idx])

    def get_state(self) -> dict:
        return {"kind": KIND, "epoch": self.epoch, "position": self.position, "group_rows": self.group_rows,
                "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        check_state(state, kind=KIND, fingerprint=self.fingerprint)
        if int(state.get("group_rows", self.group_rows)) != self.group_rows:
            raise DataError(f"the checkpoint's batches were groups of {state['group_rows']} consecutive rows, not "
                            f"{self.group_rows}. Fix: resume with --config.train.trime.group_rows={state['group_rows']}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.region:
            raise DataError(f"iterator state epoch={epoch} position={position} is out of range. Fix: resume with "
                            "the data config of the checkpoint.")
        self.epoch, self.position = epoch, position
