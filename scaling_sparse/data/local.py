"""The local corpora (stdlib, files, jsonl): read once, tokenized, cached, packed.

Token streams are cached under WORKDIR/data_cache, keyed by a fingerprint of the source, its file
list (sizes, mtimes) and the tokenizer, so a stale cache is never reused. Each process keeps the
whole (small) token stream and gathers only its rows of every global batch.

With config.data.objective="span_corruption" the same cached streams, eos removed, are cut into
T5's raw chunks and corrupted (span_corruption.py) instead of packed into windows.
"""

from __future__ import annotations

import logging
import pathlib
import sys
import time

import numpy as np
from tqdm import tqdm

from scaling_sparse import storage
from scaling_sparse.data import Data, DataError, cache, corpus, packing, prefix_lm, span_corruption
from scaling_sparse.data.tokenizer import (TOKENIZER_FILES, Tokenizer, get_tokenizer, recorded_unknown_share,
                                           record_unknown_share)

log = logging.getLogger(__name__)

_CACHE_FORMAT = 2  # bump when the cached arrays' meaning changes (2: prefix-LM loss masks)


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


def build_data(config, workdir: pathlib.Path, process_index: int = 0, process_count: int = 1) -> Data:
    d, t = config.data, config.train
    start = time.time()
    source = corpus.list_files(d, exclude=workdir)
    loaded = {}

    def load():  # read the corpus at most once, and only if the tokenizer or the cache needs it
        if "corpus" not in loaded:
            loaded["corpus"] = corpus.load_corpus(d, t.progress, source)
        return loaded["corpus"]

    prefix = d.source == "jsonl" and bool(d.input_field)
    span = d.get("objective", "lm") == "span_corruption"
    if span and prefix:
        raise DataError("config.data.objective=span_corruption corrupts plain text, but config.data.input_field="
                        f"{d.input_field!r} asks for prefix-LM examples. Fix: leave --config.data.input_field "
                        "empty, or use --config.data.objective=lm.")
    trained_here = not d.tokenizer_path and not (workdir / TOKENIZER_FILES[0]).is_file()
    tokenizer = get_tokenizer(config, workdir,
                              lambda: prefix_lm.texts_of(load().train) if prefix else load().train)
    try:
        return _assemble(config, workdir, tokenizer, source, load, prefix, span, start, process_index,
                         process_count, unknowns="record" if trained_here else None if d.tokenizer_path else "check")
    except DataError:
        # A tokenizer trained by a run whose data then failed (too little text, say) was trained on that
        # data: a later run on a fixed corpus must train its own, not trust this one.
        if trained_here:
            for name in TOKENIZER_FILES:
                (workdir / name).unlink(missing_ok=True)
        raise


# A tokenizer trained on this corpus encodes it with the share of <unk> recorded when it was trained
# (its rarest characters, fit_alphabet); this much more means it was trained on other text (a 7-piece
# tokenizer trained on "hi" encodes a real corpus 47% <unk>; adding text with new characters to a small
# corpus raises the share too, by 15 points in tests/test_data.py, and stays allowed).
UNKNOWN_SHARE_MARGIN = 0.25


def _check_unknowns(tokenizer: Tokenizer, stream: np.ndarray, workdir: pathlib.Path, mode: str) -> None:
    share = float(np.mean(stream == tokenizer.unk_id)) if len(stream) else 0.0
    if mode == "record":
        record_unknown_share(workdir, share)
        return
    recorded = recorded_unknown_share(workdir)
    if share > recorded + UNKNOWN_SHARE_MARGIN:
        raise DataError(f"{tokenizer.path or 'the tokenizer'} encodes {share:.0%} of the training split as <unk> "
                        f"({recorded:.0%} when it was trained): it was trained on other text. Fix: delete "
                        f"{workdir / TOKENIZER_FILES[0]} and {workdir / TOKENIZER_FILES[1]} to train one on this "
                        f"corpus (checkpoints in {workdir} belong to the old tokenizer: use a fresh --workdir to keep "
                        "them)")


def _read_cache(meta_path, array_paths):
    """-> (corpus stats, arrays) from the data cache, or None when it is absent or damaged (a truncated or
    overwritten file: said on stderr, then rebuilt, since it is derived from the corpus and tokenizer)."""
    if not (meta_path.is_file() and all(p.is_file() for p in array_paths)):
        return None
    try:
        return cache.read_json(meta_path), [cache.load_array(p) for p in array_paths]
    except (OSError, ValueError, EOFError) as e:  # numpy: ValueError "Failed to read all data", JSON: ValueError
        print(f"warning: the data cache {meta_path.with_suffix('')}.* is damaged ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]}); rebuilding it from the corpus (derived data: nothing is lost)",
              file=sys.stderr)
        return None


def _fetch_cache(bucket_cache, meta_path: pathlib.Path, array_paths: list):
    """The data cache another host (or an earlier run) published in the bucket, copied to this host's disk ->
    _read_cache's answer, or None when the bucket has none (or it cannot be read: rebuilt, derived data)."""
    if not (bucket_cache / meta_path.name).exists():
        return None
    try:
        for p in [*array_paths, meta_path]:  # the meta last, as when it was written
            storage.download(bucket_cache / p.name, p)
    except Exception as e:  # noqa: BLE001 - a network or permission error: derived data, rebuilt here
        print(f"warning: the data cache in {bucket_cache} could not be copied ({type(e).__name__}: {e}); "
              "rebuilding it here", file=sys.stderr)
        return None
    return _read_cache(meta_path, array_paths)


def _publish_cache(bucket_cache, paths: list) -> None:
    """Copies this host's new data cache to the bucket, the meta file last (its presence says the arrays
    are complete), so other hosts and later runs copy it instead of tokenizing the corpus again."""
    try:
        for p in paths:
            storage.write_atomic(bucket_cache / p.name, p.read_bytes())
    except Exception as e:  # noqa: BLE001 - derived data: each host can build its own
        print(f"warning: the data cache could not be copied to {bucket_cache} ({type(e).__name__}: {e}); other "
              "hosts build their own", file=sys.stderr)


def _bm25_order(stem, train_stream, seq_len: int, batch_size: int, seed: int, progress: bool):
    """TRIME_ext's BM25 grouping of the training windows (data/bm25_batches.py), cached beside the streams
    (derived data: a damaged file is regrouped)."""
    from scaling_sparse.data.bm25_batches import group_windows

    path = stem.parent / f"{stem.name}.bm25-b{batch_size}-l{seq_len}-s{seed}.npy"
    if path.is_file():
        try:
            return cache.load_array(path)
        except (OSError, ValueError, EOFError) as e:
            print(f"warning: the BM25 grouping {path} is damaged ({type(e).__name__}); regrouping (derived data)",
                  file=sys.stderr)
    start = time.time()
    order = group_windows(train_stream, seq_len, batch_size, seed, progress)
    log.info("BM25 grouping of %d windows into batches of %d in %.1f s", len(order), batch_size, time.time() - start)
    cache.save_array(path, order)
    return order


def _assemble(config, workdir, tokenizer, source, load, prefix, span, start, process_index, process_count,
              unknowns: str | None) -> Data:
    """The token streams (cached under WORKDIR/data_cache), then the training iterator and eval batches.
    unknowns: "record" the <unk> share of a tokenizer trained by this run, "check" a reused one's against
    it, or None (a tokenizer the user gave)."""
    d, t = config.data, config.train
    corpus_id = {"format": _CACHE_FORMAT, "source": d.source, "root": str(source.root),
                 "text_field": list(corpus.jsonl_fields(d)) if d.source == "jsonl" else "",
                 "validation_fraction": d.validation_fraction, "files": source.signature()}
    key = cache.fingerprint({"corpus": corpus_id, "tokenizer": cache.bytes_digest(tokenizer.model_proto)})
    # On disk beside the run; for an object-store workdir in a local directory standing for it (the streams are
    # memory-mapped, which needs files on disk), copied to and from WORKDIR/data_cache in the bucket
    # (docs/storage.md).
    stem = storage.local_mirror(workdir) / "data_cache" / f"{d.source}-{key[:16]}"
    bucket_cache = storage.path(workdir) / "data_cache" if storage.is_object_store(workdir) else None
    suffixes = [".train.npy", ".validation.npy"] + ([".train_mask.npy", ".validation_mask.npy"] if prefix else [])
    array_paths = [stem.parent / (stem.name + s) for s in suffixes]
    meta_path = stem.parent / (stem.name + ".json")

    # The meta file is written last: if it exists, all arrays were completely written before it.
    cached = _read_cache(meta_path, array_paths)
    if cached is None and bucket_cache is not None:
        cached = _fetch_cache(bucket_cache, meta_path, array_paths)
    if cached is not None:
        corpus_stats, arrays = cached
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
        if unknowns:
            _check_unknowns(tokenizer, arrays[0], workdir, unknowns)
        for p, a in zip(array_paths, arrays):
            cache.save_array(p, a)
        cache.write_json(meta_path, corpus_stats)
        cache_hit = False
    if bucket_cache is not None and process_index == 0 and not (bucket_cache / meta_path.name).exists():
        _publish_cache(bucket_cache, [*array_paths, meta_path])  # also one another local process built
    train_stream, val_stream = arrays[:2]
    train_mask, val_mask = arrays[2:] if prefix else (None, None)
    if span:
        return _span_corruption_data(config, tokenizer, key, train_stream, val_stream, corpus_stats, cache_hit,
                                     start, process_index, process_count)

    trime_memory = t.trime.memory if t.get("objective", "ce") == "trime" else None
    if trime_memory == "ext" and t.trime.get("ext_batching", "bm25") == "bm25":  # similar segments share a batch
        from scaling_sparse.data.bm25_batches import BM25Iterator

        order = _bm25_order(stem, train_stream, t.seq_len, t.batch_size, d.shuffle_seed, t.progress)
        train = BM25Iterator(train_stream, order, t.batch_size, t.seq_len, d.shuffle_seed, fingerprint=key[:16],
                             process_index=process_index, process_count=process_count)
    elif trime_memory == "long":  # consecutive segments per row group
        from scaling_sparse.data.consecutive import ConsecutiveIterator

        train = ConsecutiveIterator(train_stream, t.batch_size, t.seq_len, t.trime.group_rows, d.shuffle_seed,
                                    fingerprint=key[:16], process_index=process_index, process_count=process_count)
        train.n_windows = train.groups * train.region
    else:
        train = packing.PackedIterator(train_stream, t.batch_size, t.seq_len, d.shuffle_seed, fingerprint=key[:16],
                                       loss_mask=train_mask, process_index=process_index,
                                       process_count=process_count)
    evals = packing.eval_batches(val_stream, t.batch_size, t.seq_len, t.eval_batches, tokenizer.pad_id,
                                 loss_mask=val_mask, process_index=process_index, process_count=process_count)
    stats = dict(corpus_stats, source=d.source, train_tokens=int(len(train_stream)),
                 validation_tokens=int(len(val_stream)), train_windows=train.n_windows,
                 eval_batches=len(evals), tokenizer=tokenizer.path, vocab_size=tokenizer.vocab_size,
                 prefix_lm=prefix, cache_hit=cache_hit, seconds=round(time.time() - start, 2))
    log.info("data: %s", stats)
    return Data(tokenizer=tokenizer, train=train, eval_batches=evals, stats=stats)


def _span_corruption_data(config, tokenizer, key, train_stream, val_stream, corpus_stats, cache_hit, start,
                          process_index, process_count) -> Data:
    """build_data for config.data.objective="span_corruption": T5's examples from the cached streams."""
    d, t = config.data, config.train
    corruption = span_corruption.SpanCorruption.from_config(config, tokenizer)
    train_tokens = span_corruption.strip_eos(train_stream, tokenizer.eos_id)
    val_tokens = span_corruption.strip_eos(val_stream, tokenizer.eos_id)
    fingerprint = cache.fingerprint({"data": key, "span_corruption": corruption.params()})[:16]
    train = span_corruption.SpanCorruptionIterator(train_tokens, corruption, t.batch_size, d.shuffle_seed,
                                                   fingerprint=fingerprint, process_index=process_index,
                                                   process_count=process_count)
    evals = span_corruption.eval_batches(val_tokens, corruption, t.batch_size, t.eval_batches,
                                         process_index=process_index, process_count=process_count)
    stats = dict(corpus_stats, source=d.source, objective="span_corruption", train_tokens=int(len(train_tokens)),
                 validation_tokens=int(len(val_tokens)), chunk_tokens=corruption.tokens_length,
                 max_targets=corruption.max_targets, train_chunks=train.n_chunks, eval_batches=len(evals),
                 tokenizer=tokenizer.path, vocab_size=tokenizer.vocab_size, sentinels=len(tokenizer.sentinel_ids),
                 cache_hit=cache_hit, seconds=round(time.time() - start, 2))
    log.info("data: %s", stats)
    return Data(tokenizer=tokenizer, train=train, eval_batches=evals, stats=stats)
