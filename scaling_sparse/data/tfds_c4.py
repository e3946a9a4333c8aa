"""C4 (or any TFDS text dataset with a "text" feature) streamed from tensorflow-datasets.

The only module that imports TensorFlow, and only when config.data.source == "tfds". It works
offline on prepared data: the builder is opened with try_gcs=False, nothing is downloaded or
prepared, and a missing dataset is an error that says how to prepare it. TensorFlow is kept off
the GPU (the accelerator belongs to JAX).

Records are read in the dataset's stored order (shuffle_files=False, deterministic interleave),
tokenized in multithreaded chunks and packed sequentially into windows of L+1 tokens (stride L,
eos after each document). The iterator state is the position of the next window's first token:
{"epoch", "record", "token"}. Restoring re-opens the split and skips `record` records with
tf.data's skip, which reads through them: O(records), so resuming deep into C4's 365M records
takes time proportional to how far the run had read (not measured on real C4 here).

With config.data.objective="span_corruption" the same reader gives chunks of T5's raw length
(documents back to back, no eos, no overlap) and span_corruption.py turns them into encoder-decoder
batches; the records' `text` feature is read either way.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
from typing import Callable, Iterator

import numpy as np

from scaling_sparse import storage
from scaling_sparse.data import Data, DataError, cache, packing
from scaling_sparse.data.tokenizer import get_tokenizer

log = logging.getLogger(__name__)

_ENCODE_CHUNK = 256  # records tokenized per multithreaded SentencePiece call


def _prepare_hint(name: str, data_dir: str) -> str:
    return (f"Fix: prepare {name} once on a machine with network access and point "
            f"--config.data.tfds_data_dir at it: `tfds build {name.replace(':', ' --version=')} "
            f"--data_dir={data_dir}` (C4 needs Apache Beam and a large download; see the TFDS c4 catalog "
            "page), or copy an already prepared copy (the directory holding c4/en/<version>/ with its "
            "dataset_info.json and .tfrecord shards). Alternatively train on C4's JSON release with "
            "--config.data.source=jsonl --config.data.path='c4/en/c4-train.*.json'.")


_modules = None


def import_tfds():
    """Imports TensorFlow with the GPU hidden (once), then tensorflow_datasets."""
    global _modules
    if _modules is None:
        try:
            import tensorflow as tf
        except ImportError as e:
            raise DataError("config.data.source=tfds needs TensorFlow. Fix: pip install 'scaling-sparse[c4]' "
                            "(tensorflow-cpu and tensorflow-datasets).") from e
        try:
            tf.config.set_visible_devices([], "GPU")  # TF must not grab the accelerator's memory
        except RuntimeError:  # TF's runtime was already initialised by other code: it can't be changed now
            if tf.config.get_visible_devices("GPU"):
                log.warning("TensorFlow was initialised before the data pipeline and can see the GPU; it may "
                            "take GPU memory from JAX. Import scaling_sparse.data.tfds_c4 before using TF.")
        import tensorflow_datasets as tfds

        _modules = (tf, tfds)
    return _modules


def open_builder(data_config):
    """The prepared TFDS builder for data_config.tfds_name, or a DataError saying how to prepare it."""
    name, data_dir = data_config.tfds_name, data_config.tfds_data_dir
    if data_dir and not storage.path(os.path.expanduser(data_dir)).is_dir():  # a local folder or a gs:// one
        raise DataError(f"config.data.tfds_data_dir={data_dir!r} does not exist. " + _prepare_hint(name, data_dir))
    _, tfds = import_tfds()
    try:
        builder = tfds.builder(name, data_dir=os.path.expanduser(data_dir) if data_dir else None, try_gcs=False)
    except Exception as e:  # unknown name or version: tfds raises several types
        raise DataError(f"config.data.tfds_name={name!r}: tensorflow-datasets cannot open it ({e}). "
                        "Fix: use a registered name with a version, e.g. 'c4/en:3.1.0'.") from e
    if not builder.is_prepared():
        raise DataError(f"{name} is not prepared under {builder.data_dir} (config.data.tfds_data_dir="
                        f"{data_dir!r}). " + _prepare_hint(name, data_dir or str(builder.data_dir_root)))
    return builder


def file_formats(builder) -> set[str]:
    """The file formats a prepared copy holds ("tfrecord", "array_record", ...)."""
    info = builder.info
    return {str(getattr(f, "value", f)) for f in [info.file_format, *getattr(info, "alternative_file_formats", [])]}


def record_reader(builder, split: str) -> Callable[[int], Iterator[str]]:
    """-> open(skip): an iterator over the split's texts starting at record `skip`."""
    tf, tfds = import_tfds()

    def open_split(skip: int) -> Iterator[str]:
        read_config = tfds.ReadConfig(try_autocache=False, shuffle_seed=None)
        ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
        options = tf.data.Options()
        options.deterministic = True
        ds = ds.with_options(options).map(lambda ex: ex["text"])
        if skip:
            ds = ds.skip(skip)
        for text in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
            yield text.decode("utf-8", "replace")

    return open_split


class StreamIterator:
    """Infinite iterator of packed batches over a record stream; resumable from {"epoch","record","token"}.

    Windows are `window` tokens (default seq_len + 1) every `stride` tokens (default seq_len), with
    eos after each record when `eos`; span corruption reads chunks (window = stride, no eos) through
    `next_window`."""

    def __init__(self, open_records: Callable[[int], Iterator[str]], tokenizer, batch_size: int, seq_len: int,
                 fingerprint: str = "", split: str = "train", process_index: int = 0, process_count: int = 1,
                 *, window: int | None = None, stride: int | None = None, eos: bool = True):
        self.open_records, self.tokenizer = open_records, tokenizer
        self.rows = packing.process_rows(batch_size, process_index, process_count)
        self.batch_size, self.seq_len, self.fingerprint, self.split = batch_size, seq_len, fingerprint, split
        self.window = seq_len + 1 if window is None else window
        self.stride = seq_len if stride is None else stride
        self.eos = eos
        self._seek(0, 0, 0)

    def _seek(self, epoch: int, record: int, token: int) -> None:
        # _pending: [epoch, record, tokens] not yet fully consumed; _offset: tokens of its head already used
        # (or, while _pending is empty, of the next record to read).
        self._pending = collections.deque()
        self._offset, self._available = token, 0
        self._next = (epoch, record)
        self._reader = self._records(epoch, record)

    def _records(self, epoch: int, record: int):
        while True:
            count = 0
            for i, text in enumerate(self.open_records(record), start=record):
                count += 1
                yield epoch, i, text
            if count == 0 and record == 0:
                raise DataError(f"the {self.split} split has no records. Fix: check config.data.tfds_name.")
            epoch, record = epoch + 1, 0

    def _fill(self) -> None:
        chunk = list(itertools.islice(self._reader, _ENCODE_CHUNK))
        for (epoch, record, _), ids in zip(chunk, self.tokenizer.encode_batch([t for _, _, t in chunk])):
            tokens = np.asarray(ids + [self.tokenizer.eos_id] if self.eos else ids, np.int32)
            if not self._pending:  # after a restore, drop the head record's already-used tokens
                tokens_left = len(tokens) - self._offset
            else:
                tokens_left = len(tokens)
            self._pending.append([epoch, record, tokens])
            self._available += tokens_left
            self._next = (epoch, record + 1)

    def _window(self) -> np.ndarray:
        return self.next_window()[1]

    def next_window(self) -> tuple[tuple[int, int, int], np.ndarray]:
        """((epoch, record, token) where the window starts, its tokens); advances by `stride`."""
        while self._available < self.window:
            self._fill()
        start = (int(self._pending[0][0]), int(self._pending[0][1]), int(self._offset))
        tokens, self._offset = packing.cut_window(self._pending, self._offset, self.window, self.stride)
        self._available -= self.stride
        return start, tokens

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        windows = [self._window() for _ in range(self.batch_size)]  # the global batch: the state advances by all of it
        return packing.make_batch(np.stack(windows[self.rows]))

    def get_state(self) -> dict:
        epoch, record = (self._pending[0][0], self._pending[0][1]) if self._pending else self._next
        return {"kind": "stream", "epoch": int(epoch), "record": int(record), "token": int(self._offset),
                "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        packing.check_state(state, kind="stream", fingerprint=self.fingerprint)
        self._seek(int(state["epoch"]), int(state["record"]), int(state["token"]))


def validation_stream(open_records, tokenizer, max_tokens: int, eos: bool = True) -> np.ndarray:
    """The first max_tokens tokens (or the whole split if shorter) as one eos-joined stream (without
    eos: the documents back to back, as span corruption reads them)."""
    token_lists, total = [], 0
    reader = open_records(0)
    while total < max_tokens:
        texts = list(itertools.islice(reader, _ENCODE_CHUNK))
        if not texts:
            break
        for ids in tokenizer.encode_batch(texts):
            token_lists.append(ids)
            total += len(ids) + eos
    stream = packing.join_documents(token_lists, tokenizer.eos_id, tokenizer.vocab_size)
    if not eos:
        stream = stream[stream != tokenizer.eos_id]
    return stream[:max_tokens]


def _split_name(builder, *candidates: str) -> str:
    splits = set(builder.info.splits.keys())
    for name in candidates:
        if not splits or name in splits:
            return name
    raise DataError(f"{builder.info.full_name} has no split among {candidates} (it has {sorted(splits)}). "
                    "Fix: use a dataset with train and validation splits.")


def build_data(config, workdir, process_index: int = 0, process_count: int = 1) -> Data:
    """tfds_reader="tf.data" (default): every process reads the same record stream in stored order and
    keeps its rows of each global batch. tfds_reader="grain" (grain_rows.py): each process reads only its
    rows' records, in a seeded order. Either way the global batch does not depend on the process count."""
    d, t = config.data, config.train
    builder = open_builder(d)
    train_split = _split_name(builder, "train")
    val_split = _split_name(builder, "validation", "test")
    reader = d.get("tfds_reader", "tf.data")
    if reader == "grain":
        from scaling_sparse.data import grain_rows

        if d.get("objective", "lm") != "lm":
            raise DataError("config.data.tfds_reader=grain reads for objective=lm only. Fix: use "
                            "--config.data.tfds_reader=tf.data for span corruption.")
        formats = file_formats(builder)
        if "array_record" not in formats:  # Grain reads records by index
            raise DataError(
                f"{builder.info.full_name} under {builder.data_dir} is stored as {sorted(formats)}, but "
                "config.data.tfds_reader=grain reads records by index, which needs ArrayRecord files. Fix: convert "
                f"the prepared copy once: `tfds convert_format --dataset_version_dir={builder.data_dir} "
                "--out_file_format=array_record` (or build it with `tfds build ... --file_format=array_record`), "
                "or read it in order with --config.data.tfds_reader=tf.data.")
        train_source = grain_rows.open_source(builder, train_split)
        open_train = grain_rows.texts_in_order(train_source)
        open_val = grain_rows.texts_in_order(grain_rows.open_source(builder, val_split))
    else:
        if "tfrecord" not in file_formats(builder):  # tf.data reads TFRecord files only
            raise DataError(f"{builder.info.full_name} under {builder.data_dir} is stored as "
                            f"{sorted(file_formats(builder))}, which tf.data cannot read in order. Fix: read it "
                            "by index with --config.data.tfds_reader=grain.")
        open_train, open_val = record_reader(builder, train_split), record_reader(builder, val_split)
    tokenizer = get_tokenizer(config, workdir, lambda: open_train(0))
    key = cache.fingerprint({"dataset": d.tfds_name, "tokenizer": cache.bytes_digest(tokenizer.model_proto)})
    if d.get("objective", "lm") == "span_corruption":
        return _span_corruption_data(config, builder, tokenizer, key, (train_split, open_train),
                                     (val_split, open_val), process_index, process_count)
    if reader == "grain":
        order_key = cache.fingerprint({"data": key, "reader": "grain", "seed": d.shuffle_seed})[:16]
        long_memory = t.get("objective", "ce") == "trime" and t.trime.memory == "long"
        train = grain_rows.RowStreamIterator(
            train_source, tokenizer, t.batch_size, t.seq_len, seed=d.shuffle_seed, fingerprint=order_key,
            split=train_split, process_index=process_index, process_count=process_count,
            gather=grain_rows.process_allgather if process_count > 1 else None,
            group_rows=t.trime.group_rows if long_memory else 1)  # TRIME_long: groups of consecutive rows
    else:
        train = StreamIterator(open_train, tokenizer, t.batch_size, t.seq_len, fingerprint=key[:16],
                               split=train_split, process_index=process_index, process_count=process_count)
    val = validation_stream(open_val, tokenizer, t.eval_batches * t.batch_size * t.seq_len + 1)
    evals = packing.eval_batches(val, t.batch_size, t.seq_len, t.eval_batches, tokenizer.pad_id,
                                 process_index=process_index, process_count=process_count)
    splits = builder.info.splits
    stats = {"source": "tfds", "dataset": d.tfds_name, "data_dir": str(builder.data_dir), "reader": reader,
             "train_records": int(splits[train_split].num_examples) if train_split in splits else None,
             "validation_records": int(splits[val_split].num_examples) if val_split in splits else None,
             "validation_tokens": int(len(val)), "eval_batches": len(evals), "tokenizer": tokenizer.path,
             "vocab_size": tokenizer.vocab_size}
    log.info("data: %s", stats)
    return Data(tokenizer=tokenizer, train=train, eval_batches=evals, stats=stats)


def _span_corruption_data(config, builder, tokenizer, key, train, val, process_index, process_count) -> Data:
    """build_data for config.data.objective="span_corruption" (span_corruption.py)."""
    from scaling_sparse.data import span_corruption

    d, t = config.data, config.train
    (train_split, open_train), (val_split, open_val) = train, val
    corruption = span_corruption.SpanCorruption.from_config(config, tokenizer)
    chunk = corruption.tokens_length
    fingerprint = cache.fingerprint({"data": key, "span_corruption": corruption.params()})[:16]
    chunks = StreamIterator(open_train, tokenizer, t.batch_size, chunk, fingerprint=key[:16], split=train_split,
                            window=chunk, stride=chunk, eos=False)
    train_iter = span_corruption.StreamSpanIterator(chunks, corruption, t.batch_size, d.shuffle_seed, fingerprint,
                                                    process_index=process_index, process_count=process_count)
    val_stream = validation_stream(open_val, tokenizer, t.eval_batches * t.batch_size * chunk, eos=False)
    evals = span_corruption.eval_batches(val_stream, corruption, t.batch_size, t.eval_batches, split=val_split,
                                         process_index=process_index, process_count=process_count)
    splits = builder.info.splits
    stats = {"source": "tfds", "dataset": d.tfds_name, "data_dir": str(builder.data_dir),
             "objective": "span_corruption", "chunk_tokens": chunk, "max_targets": corruption.max_targets,
             "train_records": int(splits[train_split].num_examples) if train_split in splits else None,
             "validation_records": int(splits[val_split].num_examples) if val_split in splits else None,
             "validation_tokens": int(len(val_stream)), "eval_batches": len(evals), "tokenizer": tokenizer.path,
             "vocab_size": tokenizer.vocab_size, "sentinels": len(tokenizer.sentinel_ids)}
    log.info("data: %s", stats)
    return Data(tokenizer=tokenizer, train=train_iter, eval_batches=evals, stats=stats)
