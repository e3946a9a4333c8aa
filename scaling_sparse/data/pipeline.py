"""build_data(config, workdir): the one entry point of the training loop into the data.

    data = build_data(config, workdir)
    data.tokenizer.encode(text) / .decode(ids) / .vocab_size / .pad_id (0) / .eos_id (1)
    next(data.train) -> {"inputs": int32 [B, L], "targets": int32 [B, L], "weights": float32 [B, L]}
    data.train.get_state() / .set_state(state)   JSON-serialisable; saved with each checkpoint
    data.eval_batches                              deterministic validation batches
    data.stats                                     counts for logging

Local corpora (stdlib, files, jsonl) are tokenized once and the token streams cached under
WORKDIR/data_cache, keyed by a fingerprint of the source, its file list (sizes, mtimes) and the
tokenizer, so a stale cache is never reused. C4 (tfds) streams from tensorflow-datasets.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any

from tqdm import tqdm

from scaling_sparse.data import DataError, cache, corpus, packing, prefix_lm
from scaling_sparse.data.tokenizer import Tokenizer, cached_or_trained, load_tokenizer

log = logging.getLogger(__name__)

_CACHE_FORMAT = 2  # bump when the cached arrays' meaning changes (2: prefix-LM loss masks)


@dataclasses.dataclass
class Data:
    tokenizer: Tokenizer
    train: Any            # PackedIterator | tfds_c4.StreamIterator: next(), get_state(), set_state()
    eval_batches: list
    stats: dict


def build_data(config, workdir) -> Data:
    """Builds tokenizer, training iterator and validation batches for the validated config."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.data.source == "tfds":
        from scaling_sparse.data import tfds_c4  # TensorFlow only on this path

        return tfds_c4.build_data(config, workdir)
    if config.data.source in ("stdlib", "files", "jsonl"):
        return _build_local(config, workdir)
    raise DataError(f"config.data.source={config.data.source!r} is unknown. Fix: use stdlib | files | jsonl | tfds.")


def tokenizer_request(config) -> dict:
    """What a trained WORKDIR/tokenizer.model was made from (checked when it is reused)."""
    d = config.data
    return {"source": d.source, "path": d.path if d.source != "tfds" else d.tfds_name,
            "text_field": list(corpus.jsonl_fields(d)) if d.source == "jsonl" else "", "max_files": d.max_files,
            "validation_fraction": d.validation_fraction, "vocab_size": config.model.vocab_size,
            "tokenizer_train_chars": d.tokenizer_train_chars}


def get_tokenizer(config, workdir, train_texts) -> Tokenizer:
    """The given tokenizer_path, else WORKDIR/tokenizer.model (trained on train_texts() if absent)."""
    d = config.data
    if d.tokenizer_path:
        return load_tokenizer(d.tokenizer_path, config.model.vocab_size)
    return cached_or_trained(workdir, tokenizer_request(config), config.model.vocab_size,
                             d.tokenizer_train_chars, train_texts)


def encode_documents(tokenizer: Tokenizer, texts: list[str], desc: str, progress: bool):
    """Documents -> one eos-joined token stream, encoded in multithreaded chunks of ~1 MB."""
    token_lists, chunk, chunk_chars = [], [], 0
    with tqdm(total=sum(map(len, texts)), desc=desc, unit="char", unit_scale=True, disable=not progress,
              leave=False) as bar:
        for i, text in enumerate(texts):
            chunk.append(text)
            chunk_chars += len(text)
            if chunk_chars >= 1 << 20 or i == len(texts) - 1:
                token_lists.extend(tokenizer.encode_batch(chunk))
                bar.update(chunk_chars)
                chunk, chunk_chars = [], 0
    return packing.join_documents(token_lists, tokenizer.eos_id, tokenizer.vocab_size)


def _build_local(config, workdir: pathlib.Path) -> Data:
    d, t = config.data, config.train
    start = time.time()
    source = corpus.list_files(d, exclude=workdir)
    loaded = {}

    def load():  # read the corpus at most once, and only if the tokenizer or the cache needs it
        if "corpus" not in loaded:
            loaded["corpus"] = corpus.load_corpus(d, t.progress, source)
        return loaded["corpus"]

    prefix = d.source == "jsonl" and bool(d.input_field)
    tokenizer = get_tokenizer(config, workdir,
                              lambda: prefix_lm.texts_of(load().train) if prefix else load().train)
    corpus_id = {"format": _CACHE_FORMAT, "source": d.source, "root": str(source.root),
                 "text_field": list(corpus.jsonl_fields(d)) if d.source == "jsonl" else "",
                 "validation_fraction": d.validation_fraction, "files": source.signature()}
    key = cache.fingerprint({"corpus": corpus_id, "tokenizer": cache.bytes_digest(tokenizer.model_proto)})
    stem = workdir / "data_cache" / f"{d.source}-{key[:16]}"
    suffixes = [".train.npy", ".validation.npy"] + ([".train_mask.npy", ".validation_mask.npy"] if prefix else [])
    array_paths = [stem.parent / (stem.name + s) for s in suffixes]
    meta_path = stem.parent / (stem.name + ".json")

    # The meta file is written last: if it exists, all arrays were completely written before it.
    if meta_path.is_file() and all(p.is_file() for p in array_paths):
        corpus_stats = cache.read_json(meta_path)
        arrays = [cache.load_array(p) for p in array_paths]
        cache_hit = True
    else:
        c = load()
        if prefix:
            (train_stream, train_mask), (val_stream, val_mask) = (
                prefix_lm.encode_examples(tokenizer, c.train), prefix_lm.encode_examples(tokenizer, c.validation))
            arrays = [train_stream, val_stream, train_mask, val_mask]
        else:
            arrays = [encode_documents(tokenizer, c.train, "tokenizing train", t.progress),
                      encode_documents(tokenizer, c.validation, "tokenizing validation", t.progress)]
        corpus_stats = c.stats
        for p, a in zip(array_paths, arrays):
            cache.save_array(p, a)
        cache.write_json(meta_path, corpus_stats)
        cache_hit = False
    train_stream, val_stream = arrays[:2]
    train_mask, val_mask = arrays[2:] if prefix else (None, None)

    train = packing.PackedIterator(train_stream, t.batch_size, t.seq_len, d.shuffle_seed, fingerprint=key[:16],
                                   loss_mask=train_mask)
    evals = packing.eval_batches(val_stream, t.batch_size, t.seq_len, t.eval_batches, tokenizer.pad_id,
                                 loss_mask=val_mask)
    stats = dict(corpus_stats, source=d.source, train_tokens=int(len(train_stream)),
                 validation_tokens=int(len(val_stream)), train_windows=train.n_windows,
                 eval_batches=len(evals), tokenizer=tokenizer.path, vocab_size=tokenizer.vocab_size,
                 prefix_lm=prefix, cache_hit=cache_hit, seconds=round(time.time() - start, 2))
    log.info("data: %s", stats)
    return Data(tokenizer=tokenizer, train=train, eval_batches=evals, stats=stats)
