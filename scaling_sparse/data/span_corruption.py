"""T5 span corruption: the encoder-decoder's denoising objective (config.data.objective="span_corruption").

Follows t5/data/preprocessors.py (google-research/text-to-text-transfer-transformer): `span_corruption`
= `random_spans_helper` (raw chunk length) -> `reduce_concat_tokens` + `split_tokens` (documents
concatenated, cut into chunks of that length) -> `denoise` with `random_spans_noise_mask`,
`noise_span_to_unique_sentinel` (inputs) and `nonnoise_span_to_unique_sentinel` (targets), then eos
appended to both. Written here in numpy; docs/semantics.md "Span corruption (T5)" lists the choices.

    text  a b c d e f g h i      mask  . . x x . . . x .   (noise spans in order: "c d", "h")
    inputs   a b <S0> e f g <S1> i eos       encoder tokens
    targets  <S0> c d <S1> h eos             decoder targets (sentinel i: tokenizer.sentinel_ids[i])

Batches: {"inputs": int32 [b, Li], "decoder_inputs": int32 [b, Lt] (targets shifted right, starting
with 0), "targets": int32 [b, Lt], "weights": float32 [b, Lt]}, Li = train.inputs_len,
Lt = train.seq_len, padded with 0 (weight 0). Every example draws its noise mask from its own seed,
(shuffle_seed, position of its chunk), so an iterator's whole state is the position of its next
chunk, each process corrupts only its own rows, and a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from scaling_sparse.data import DataError, packing

log = logging.getLogger(__name__)

KIND = "span_corruption"                # state kind of the in-memory (local corpora) iterator
STREAM_KIND = "span_corruption_stream"  # state kind of the TFDS record-stream iterator
_EVAL_ENTROPY = 0x5C0DE  # validation masks: seeded by (this, chunk index), the same for every run


# ---- lengths ---------------------------------------------------------------------------------------

def noise_counts(length, noise_density: float, mean_noise_span_length: float):
    """(noise tokens, noise spans) of a mask over `length` tokens (ints or int arrays), exactly as
    random_spans_noise_mask draws it: round(length * density) noise tokens, at least 1 and at most
    length - 1 (a length below 2 counts as 2), in round(noise / mean) spans, at least 1. Also at most
    as many spans as noise or non-noise tokens (T5 fails there; only extreme densities reach it)."""
    length = np.maximum(np.asarray(length, np.int64), 2)
    noise = np.clip(np.round(length * noise_density).astype(np.int64), 1, length - 1)
    spans = np.maximum(np.round(noise / mean_noise_span_length).astype(np.int64), 1)
    spans = np.minimum(spans, np.minimum(noise, length - noise))
    return noise, spans


def corrupted_lengths(length, noise_density: float, mean_noise_span_length: float):
    """(inputs, targets) lengths, eos included, after corrupting `length` tokens (one sentinel per
    noise span in the inputs, one per non-noise span in the targets). An upper bound for length 1."""
    noise, spans = noise_counts(length, noise_density, mean_noise_span_length)
    nonnoise = np.maximum(np.asarray(length, np.int64), 2) - noise
    return nonnoise + spans + 1, noise + spans + 1


def random_spans_helper(inputs_length: int, noise_density: float, mean_noise_span_length: float,
                        targets_length: int | None = None) -> tuple[int, int]:
    """(raw tokens per example, longest targets incl. eos): the longest chunk whose corrupted inputs
    fit inputs_length (eos included): T5's random_spans_helper (568 and 114 for 512 / 0.15 / 3).
    Unlike T5, which raises when its targets exceed the configured targets length, a targets_length
    bound shortens the chunk so that the targets fit as well. Chunks shorter than the result (a
    validation split's last one) fit too: the lengths are taken as running maxima."""
    top = int(inputs_length / (1.0 - noise_density)) + 2  # inputs(L) >= L (1 - density) + 1/2
    lengths = np.arange(1, top + 1)
    inputs, targets = (np.maximum.accumulate(x) for x in
                       corrupted_lengths(lengths, noise_density, mean_noise_span_length))
    fits = inputs <= inputs_length
    if targets_length is not None:
        fits &= targets <= targets_length
    tokens_length = int(np.argmin(fits)) if not fits.all() else top  # fits is a prefix of True
    if tokens_length < 2:
        raise DataError(f"span corruption cannot fit a 2-token chunk into train.inputs_len={inputs_length} "
                        f"and train.seq_len={targets_length} (targets). Fix: raise --config.train.inputs_len "
                        "and --config.train.seq_len (T5: 512 and 114 or more).")
    return tokens_length, int(targets[tokens_length - 1])


# ---- one example -----------------------------------------------------------------------------------

def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """num_items split into num_segments positive lengths, all splits equally likely (T5: a shuffled
    indicator of segment starts; here the same law: num_segments - 1 distinct cut points)."""
    first_in_segment = np.zeros(num_items, np.int64)
    first_in_segment[1 + rng.choice(num_items - 1, num_segments - 1, replace=False)] = 1
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """bool [length]: noise spans alternating with non-noise spans, starting with non-noise (so it
    ends with noise); counts from `noise_counts`, span lengths from random segmentations."""
    noise, spans = (int(x) for x in noise_counts(length, noise_density, mean_noise_span_length))
    nonnoise = max(length, 2) - noise
    noise_lengths = _random_segmentation(noise, spans, rng)
    nonnoise_lengths = _random_segmentation(nonnoise, spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), interleaved)[:length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids) -> np.ndarray:
    """Each run of noise tokens -> one sentinel, the i-th run sentinel_ids[i]; other tokens kept."""
    tokens = np.asarray(tokens, np.int32)
    previous = np.concatenate([[False], noise_mask[:-1]])
    first = noise_mask & ~previous
    out = tokens.copy()
    out[first] = np.asarray(sentinel_ids, np.int32)[: int(first.sum())]
    return out[~(noise_mask & previous)]


def nonnoise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids) -> np.ndarray:
    """Each run of non-noise tokens -> one sentinel: the targets, noise spans behind their sentinels."""
    return noise_span_to_unique_sentinel(tokens, ~noise_mask, sentinel_ids)


def reconstruct(inputs, targets, sentinel_ids, eos_id: int = 1) -> np.ndarray:
    """The original tokens from one example's inputs and targets (padding, eos dropped): each
    sentinel in the inputs replaced by the tokens that follow the same sentinel in the targets."""
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    inputs = inputs[: int(np.argmax(inputs == eos_id))] if (inputs == eos_id).any() else inputs
    targets = targets[: int(np.argmax(targets == eos_id))] if (targets == eos_id).any() else targets
    index = {int(s): i for i, s in enumerate(sentinel_ids)}
    spans, current = {}, None
    for t in targets.tolist():
        if t in index:
            current = spans.setdefault(index[t], [])
        elif current is not None:
            current.append(t)
    out = []
    for t in inputs.tolist():
        out.extend(spans.get(index[t], []) if t in index else [t])
    return np.asarray(out, np.int64)


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
    """The objective's parameters; turns raw token chunks into examples and batches."""

    noise_density: float
    mean_noise_span_length: float
    inputs_len: int        # Li: encoder length (train.inputs_len)
    targets_len: int       # Lt: decoder length (train.seq_len)
    tokens_length: int     # raw tokens per example (random_spans_helper)
    max_targets: int       # the longest targets (eos included) a chunk gives, <= targets_len
    sentinel_ids: tuple
    eos_id: int = 1

    @classmethod
    def from_config(cls, config, tokenizer) -> "SpanCorruption":
        d, t = config.data, config.train
        density, mean = float(d.noise_density), float(d.mean_noise_span_length)
        tokens_length, max_targets = random_spans_helper(t.inputs_len, density, mean, t.seq_len)
        t5_tokens, t5_targets = random_spans_helper(t.inputs_len, density, mean)
        if tokens_length < t5_tokens:
            log.warning("span corruption: train.seq_len=%d < the %d target tokens T5 needs for train.inputs_len=%d "
                        "(T5 raises here): chunks shortened to %d raw tokens, inputs use %d of %d",
                        t.seq_len, t5_targets, t.inputs_len, tokens_length,
                        int(corrupted_lengths(tokens_length, density, mean)[0]), t.inputs_len)
        spans = int(noise_counts(tokens_length, density, mean)[1])
        sentinels = tuple(int(i) for i in tokenizer.sentinel_ids)
        if spans > len(sentinels):
            raise DataError(
                f"span corruption needs {spans} sentinels per example ({tokens_length}-token chunks for "
                f"train.inputs_len={t.inputs_len}, data.noise_density={density}, data.mean_noise_span_length="
                f"{mean}), but tokenizer {tokenizer.path or ''} has {len(sentinels)} (<extra_id_N> pieces; a "
                "trained tokenizer reserves min(100, model.vocab_size // 8)). Fix: lower --config.train.inputs_len "
                "or --config.data.noise_density, raise --config.data.mean_noise_span_length, or raise "
                "--config.model.vocab_size (a tokenizer trained in an older --workdir keeps its sentinels: use a "
                "fresh one).")
        return cls(density, mean, int(t.inputs_len), int(t.seq_len), tokens_length, max_targets, sentinels,
                   int(tokenizer.eos_id))

    def params(self) -> dict:
        """What the examples depend on besides the tokens (part of the iterators' fingerprints)."""
        return dataclasses.asdict(self)

    def example(self, tokens, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Raw tokens (<= tokens_length) -> (inputs, targets), each ending with eos."""
        tokens = np.asarray(tokens, np.int32)
        mask = random_spans_noise_mask(len(tokens), self.noise_density, self.mean_noise_span_length, rng)
        eos = np.array([self.eos_id], np.int32)
        return (np.concatenate([noise_span_to_unique_sentinel(tokens, mask, self.sentinel_ids), eos]),
                np.concatenate([nonnoise_span_to_unique_sentinel(tokens, mask, self.sentinel_ids), eos]))

    def batch(self, examples) -> dict:
        """[(inputs, targets) or None (an empty padding row)] -> the padded batch dict."""
        b = len(examples)
        inputs = np.zeros([b, self.inputs_len], np.int32)
        targets = np.zeros([b, self.targets_len], np.int32)
        weights = np.zeros([b, self.targets_len], np.float32)
        for r, ex in enumerate(examples):
            if ex is None:
                continue
            x, y = ex
            if len(x) > self.inputs_len or len(y) > self.targets_len:  # random_spans_helper rules this out
                raise AssertionError(f"span corruption example of {len(x)} / {len(y)} tokens exceeds "
                                     f"{self.inputs_len} / {self.targets_len}")
            inputs[r, : len(x)] = x
            targets[r, : len(y)] = y
            weights[r, : len(y)] = 1.0
        decoder_inputs = np.zeros_like(targets)  # T5's decoder start id is the pad id 0
        decoder_inputs[:, 1:] = targets[:, :-1]
        return {"inputs": inputs, "decoder_inputs": decoder_inputs, "targets": targets, "weights": weights}


def strip_eos(stream: np.ndarray, eos_id: int) -> np.ndarray:
    """An eos-joined document stream -> the documents' tokens back to back (T5's reduce_concat_tokens
    concatenates documents without a separator; eos ends each example's inputs and targets instead)."""
    return stream[stream != eos_id]


# ---- iterators and validation batches ---------------------------------------------------------------

class SpanCorruptionIterator:
    """Infinite iterator of span-corruption batches over an in-memory token stream (documents back to
    back, no eos), mirroring packing.PackedIterator: each epoch visits the stream's chunks of
    tokens_length in an order drawn from (shuffle_seed, epoch), the chunk grid shifted by a seeded
    offset after the first epoch; chunk i of epoch e is corrupted with the seed (shuffle_seed, e, i).
    The state is {"epoch", "position"} of the global batch; each process corrupts only its rows."""

    def __init__(self, stream: np.ndarray, corruption: SpanCorruption, batch_size: int, seed: int,
                 fingerprint: str = "", process_index: int = 0, process_count: int = 1):
        self.stream, self.corruption, self.batch_size, self.seed = stream, corruption, batch_size, seed
        self.rows = packing.process_rows(batch_size, process_index, process_count)
        self.fingerprint = fingerprint
        self.chunk = corruption.tokens_length
        self.n_chunks = len(stream) // self.chunk
        if self.n_chunks < 1:
            raise DataError(f"the training split has {len(stream)} tokens, fewer than one span-corruption chunk of "
                            f"{self.chunk} (train.inputs_len={corruption.inputs_len}). Fix: add text to the corpus "
                            "or lower --config.train.inputs_len.")
        self._slack = len(stream) - self.n_chunks * self.chunk
        self.epoch, self.position = 0, 0
        self._plan_epoch = None

    def _plan(self, epoch: int):
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.n_chunks)
            offset = int(rng.integers(0, self._slack + 1)) if epoch else 0
            self._plan_epoch, self._order, self._offset = epoch, order, offset
        return self._order, self._offset

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        picks = []  # (epoch, grid offset, chunk index) of each row of the global batch
        while len(picks) < self.batch_size:
            order, offset = self._plan(self.epoch)
            take = order[self.position: self.position + self.batch_size - len(picks)]
            picks.extend((self.epoch, offset, int(i)) for i in take)
            self.position += len(take)
            if self.position == self.n_chunks:
                self.epoch, self.position = self.epoch + 1, 0
        examples = []
        for epoch, offset, i in picks[self.rows]:
            start = offset + i * self.chunk
            rng = np.random.default_rng([self.seed, epoch, i])
            examples.append(self.corruption.example(self.stream[start: start + self.chunk], rng))
        return self.corruption.batch(examples)

    def get_state(self) -> dict:
        return {"kind": KIND, "epoch": self.epoch, "position": self.position, "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        packing.check_state(state, kind=KIND, fingerprint=self.fingerprint)
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n_chunks:
            raise DataError(f"iterator state epoch={epoch} position={position} is out of range for "
                            f"{self.n_chunks} chunks. Fix: resume with the data config of the checkpoint.")
        self.epoch, self.position = epoch, position


class StreamSpanIterator:
    """Span-corruption batches over a record stream: `chunks` (tfds_c4.StreamIterator with
    window = stride = tokens_length and no eos) gives consecutive chunks with their start
    (epoch, record, token); the chunk starting there is corrupted with the seed
    (shuffle_seed, epoch, record, token). The state is the chunk stream's."""

    def __init__(self, chunks, corruption: SpanCorruption, batch_size: int, seed: int, fingerprint: str = "",
                 process_index: int = 0, process_count: int = 1):
        self.chunks, self.corruption, self.batch_size, self.seed = chunks, corruption, batch_size, seed
        self.rows = packing.process_rows(batch_size, process_index, process_count)
        self.fingerprint = fingerprint

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        windows = [self.chunks.next_window() for _ in range(self.batch_size)]  # the global batch
        return self.corruption.batch([self.corruption.example(tokens, np.random.default_rng([self.seed, *start]))
                                      for start, tokens in windows[self.rows]])

    def get_state(self) -> dict:
        return dict(self.chunks.get_state(), kind=STREAM_KIND, fingerprint=self.fingerprint)

    def set_state(self, state: dict) -> None:
        packing.check_state(state, kind=STREAM_KIND, fingerprint=self.fingerprint)
        self.chunks.set_state(dict(state, kind="stream", fingerprint=self.chunks.fingerprint))


def eval_batches(stream: np.ndarray, corruption: SpanCorruption, batch_size: int, max_batches: int,
                 split: str = "validation", process_index: int = 0, process_count: int = 1) -> list[dict]:
    """Deterministic validation batches: the stream's first chunks of tokens_length in order (the
    last may be shorter), chunk i corrupted with the seed (_EVAL_ENTROPY, i); a last batch with
    fewer chunks is filled with empty rows (weight 0)."""
    chunk = corruption.tokens_length
    if len(stream) < 2:
        raise DataError(f"the {split} split has {len(stream)} tokens, too few for one span-corruption example. "
                        "Fix: add text to the corpus or raise --config.data.validation_fraction.")
    n_chunks = min(-(-len(stream) // chunk), max_batches * batch_size)
    rows = packing.process_rows(batch_size, process_index, process_count)
    batches = []
    for b in range(-(-n_chunks // batch_size)):
        examples = [corruption.example(stream[i * chunk: (i + 1) * chunk], np.random.default_rng([_EVAL_ENTROPY, i]))
                    if i < n_chunks else None for i in range(b * batch_size, (b + 1) * batch_size)[rows]]
        batches.append(corruption.batch(examples))
    return batches
