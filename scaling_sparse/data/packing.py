"""Packing: documents joined with eos into one token stream, cut into windows of L+1 tokens.

Window i covers stream[offset + i*L : offset + i*L + L + 1]; inputs are its first L tokens and
targets its last L, so consecutive windows share one token and every token is a target once.
The training iterator visits the windows of each epoch in an order drawn from
(shuffle_seed, epoch); its whole state is {"epoch", "position"}, so a resumed run sees exactly the
same batches. Each epoch after the first also shifts the window grid by a seeded offset, so the
model does not see identical windows every epoch.
"""

from __future__ import annotations

import numpy as np

from scaling_sparse.data import DataError


def join_documents(token_lists, eos_id: int, vocab_size: int) -> np.ndarray:
    """[doc tokens] -> one stream with eos after every document (uint16 when the vocabulary fits)."""
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    parts = []
    eos = np.array([eos_id], dtype)
    for ids in token_lists:
        parts.append(np.asarray(ids, dtype))
        parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros([0], dtype)


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of a global batch that one process feeds: a contiguous block, in process order (the
    order in which jax.make_array_from_process_local_data assembles the global batch)."""
    if batch_size % process_count:
        raise DataError(f"config.train.batch_size {batch_size} is not divisible by the {process_count} processes. "
                        f"Fix: use a multiple of {process_count}")
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def cut_window(pending, offset: int, window: int, stride: int) -> tuple[np.ndarray, int]:
    """The streaming readers' packing step (tfds_c4.StreamIterator, grain_rows.RowStreamIterator): `pending`
    is a deque of records [..., tokens] not yet fully used, its head's first `offset` tokens used already.
    -> (the next `window` tokens, the new offset), advancing by `stride` and dropping used-up records.
    The caller has made sure at least `window` tokens are pending."""
    parts, need, at = [], window, offset
    for record in pending:
        part = record[-1][at: at + need]
        parts.append(part)
        need -= len(part)
        at = 0
        if not need:
            break
    advance = stride  # L of an L + 1 window: its last token is the next window's first
    while advance:
        left = len(pending[0][-1]) - offset
        if advance < left:
            offset += advance
            advance = 0
        else:
            advance -= left
            pending.popleft()
            offset = 0
    return np.concatenate(parts), offset


def make_batch(windows: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """windows int [B, L+1] -> {"inputs", "targets": int32 [B, L], "weights": float32 [B, L]}."""
    windows = windows.astype(np.int32)
    if weights is None:
        weights = np.ones([windows.shape[0], windows.shape[1] - 1], np.float32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:], "weights": weights.astype(np.float32)}


def eval_batches(stream: np.ndarray, batch_size: int, seq_len: int, max_batches: int, pad_id: int,
                 split: str = "validation", loss_mask: np.ndarray | None = None, process_index: int = 0,
                 process_count: int = 1) -> list[dict]:
    """The first max_batches batches of the stream's windows, in order (deterministic).

    loss_mask (same length as the stream, prefix-LM) zeroes the weight of non-target tokens.

    The last window may be partial and the last batch may have fewer real rows: both are padded
    with pad_id and weight 0, so a small validation split still gives at least one batch.
    """
    n_tokens = len(stream)
    if n_tokens < 2:
        raise DataError(f"the {split} split has {n_tokens} tokens, too few for one target. Fix: add text "
                        "to the corpus or raise --config.data.validation_fraction.")
    n_windows = min(-(-(n_tokens - 1) // seq_len), max_batches * batch_size)
    n_batches = -(-n_windows // batch_size)
    windows = np.full([n_batches * batch_size, seq_len + 1], pad_id, np.int64)
    weights = np.zeros([n_batches * batch_size, seq_len], np.float32)
    for i in range(n_windows):
        chunk = stream[i * seq_len: i * seq_len + seq_len + 1]
        windows[i, : len(chunk)] = chunk
        weights[i, : len(chunk) - 1] = 1.0 if loss_mask is None else loss_mask[i * seq_len + 1: i * seq_len + len(chunk)]
    rows = process_rows(batch_size, process_index, process_count)
    return [make_batch(windows[b * batch_size:(b + 1) * batch_size][rows], weights[b * batch_size:(b + 1) * batch_size][rows])
            for b in range(n_batches)]


def check_state(state: dict, *, kind: str, fingerprint: str | None) -> None:
    """A checkpointed iterator state must come from the same kind of iterator over the same corpus and
    tokenizer, or a resumed run would not see the same batches."""
    if state.get("kind") != kind:
        raise DataError(f"the saved data position (kind {state.get('kind')!r}) is not a {kind!r} iterator state. "
                        "Fix: resume with the data config (config.data.source, config.data.tfds_reader) the "
                        "checkpoint was written with.")
    if fingerprint and state.get("fingerprint") not in (None, fingerprint):
        raise DataError("the checkpoint's data iterator was saved over a different corpus or tokenizer "
                        f"(fingerprint {state.get('fingerprint')!r}, now {fingerprint!r}), so resuming "
                        "would not see the same batches. Fix: resume with the original data config and "
                        "tokenizer, or start a fresh --workdir.")


class PackedIterator:
    """Infinite iterator of shuffled training batches over a token stream held in memory. With
    several processes each gathers only its rows of every global batch (process_rows); the plan and
    the state are the global batch's, the same in every process."""

    def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int, seed: int, fingerprint: str = "",
                 loss_mask: np.ndarray | None = None, process_index: int = 0, process_count: int = 1):
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
        self.rows = process_rows(batch_size, process_index, process_count)
        self.loss_mask = loss_mask  # prefix-LM: 1 where the token is a target (weights of the batch)
        self.fingerprint = fingerprint
        self.n_windows = (len(stream) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"the training split has {len(stream)} tokens, fewer than train.seq_len + 1 = "
                            f"{seq_len + 1}. Fix: add text to the corpus or lower --config.train.seq_len.")
        # Room to shift the window grid without losing a window.
        self._slack = len(stream) - 1 - self.n_windows * seq_len
        self.epoch, self.position = 0, 0
        self._plan_epoch = None

    def _plan(self, epoch: int):
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.n_windows)
            offset = int(rng.integers(0, self._slack + 1)) if epoch else 0
            self._plan_epoch, self._order, self._offset = epoch, order, offset
        return self._order, self._offset

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        starts = []
        while len(starts) < self.batch_size:
            order, offset = self._plan(self.epoch)
            take = order[self.position: self.position + self.batch_size - len(starts)]
            starts.extend(offset + take * self.seq_len)
            self.position += len(take)
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
        idx = np.asarray(starts)[self.rows, None] + np.arange(self.seq_len + 1)
        weights = None if self.loss_mask is None else self.loss_mask[idx[:, 1:]]
        return make_batch(self.stream[idx], weights)

    def get_state(self) -> dict:
        return {"kind": "packed", "epoch": self.epoch, "position": self.position,
                "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        check_state(state, kind="packed", fingerprint=self.fingerprint)
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n_windows:
            raise DataError(f"iterator state epoch={epoch} position={position} is out of range for "
                            f"{self.n_windows} windows. Fix: resume with the data config of the checkpoint.")
        self.epoch, self.position = epoch, position
