"""TRIME's external memory and kNN-LM: a datastore of (key g, next token) over the training split,
searched with faiss (docs/trime.md, "Datastore").

    python -m scaling_sparse datastore --workdir=W [--datastore_tokens=N]
    python -m scaling_sparse eval --workdir=W --memory=local --datastore [--knn_k=1024 --knn_lambda=0.3 ...]

Build: the model (eval mode, one forward pass per batch of windows) gives every training token's
features g (the last block's pre-FFN LayerNorm output, trime_loss.py) and the token that followed it.
Keys are stored float16 in `W/datastore/keys.f16` (a memory-mapped [N, d] file), values int32 in
`values.i32`, and `index.faiss`: an exact inner-product index (`IndexFlatIP`) up to
`EXACT_MAX` keys, above it an IVF-PQ index (an inner-product flat quantizer, up to 4096 lists, 64
sub-vectors of 8 bits; trained on up to 1M keys, nprobe 32), the reference's settings (fewer sub-vectors
where d_model has no 64 equal parts, fewer bits for a store too small to train them). Written into
`datastore.partial/` and renamed when complete: a crash leaves no half datastore that a later eval trusts.

Search: the top-k keys by inner product with each query g. Scoring (`knn_token_losses`):
  memory=local or long (TrimeLM_ext): the neighbours join the joint softmax of trime_loss.py as
  IP / sqrt(d) / tau next to the vocabulary and the in-batch memory (the window's earlier tokens, or every
  earlier token of the batch), then p = (1 - lambda) p_joint + lambda p_kNN;
  memory=none (kNN-LM): p = (1 - lambda) p_LM + lambda p_kNN;
  p_kNN(w) = sum over neighbours with value w of exp(IP / tau_knn), normalised over the k neighbours.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import sys

import numpy as np

DIR_NAME = "datastore"
EXACT_MAX = 200_000  # keys up to which the index is exact (IndexFlatIP); above: IVF-PQ
IVF_LISTS, PQ_BYTES, TRAIN_KEYS, NPROBE = 4096, 64, 1_000_000, 32


class DatastoreError(RuntimeError):
    """A datastore that is missing, incomplete or built for another checkpoint; the message says the fix."""

    exit_code = 1


def _faiss():
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its "no AVX-512 build" info lines
    try:
        import faiss
    except ImportError as e:
        raise DatastoreError("the datastore needs faiss. Fix: pip install faiss-cpu") from e
    return faiss


def windows_of(data, batch_size: int, seq_len: int, max_tokens: int):
    """Batches {"inputs", "targets", "weights"} covering the training split once: the token stream's
    windows in order where the iterator holds the stream (local corpora), else batches of a fresh
    iterator (TFDS) up to max_tokens."""
    from scaling_sparse.data import packing

    stream = getattr(data.train, "stream", None)
    if stream is None:
        if not max_tokens:
            raise DatastoreError("this data source is a stream without an end: give --datastore_tokens=N")
        for _ in range(math.ceil(max_tokens / (batch_size * seq_len))):
            yield next(data.train)
        return
    n_windows = (len(stream) - 1) // seq_len
    if max_tokens:
        n_windows = min(n_windows, math.ceil(max_tokens / seq_len))
    for start in range(0, n_windows, batch_size):
        rows = [stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(start, min(start + batch_size, n_windows))]
        yield packing.make_batch(np.stack(rows))


def build(config, workdir, *, step: int | None = None, max_tokens: int = 0, echo=print) -> dict:
    """Builds W/datastore for the workdir's latest (or given) checkpoint -> its meta."""
    import jax
    from flax import nnx

    from scaling_sparse import sharding
    from scaling_sparse.train import load_data, load_params

    if jax.process_count() > 1:
        raise DatastoreError("the datastore is built by one process. Fix: run `datastore` without the multi-process flags")
    faiss = _faiss()
    workdir = pathlib.Path(workdir)
    mesh = sharding.single_device_mesh()
    graphdef, params, step = load_params(config, workdir, step=step, mesh=mesh)
    data = load_data(config, workdir)
    t = config.train

    @jax.jit
    def features(params, inputs):
        _, g = nnx.merge(graphdef, params)(inputs, features=True)
        return g

    final, partial = workdir / DIR_NAME, workdir / (DIR_NAME + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    d = config.model.d_model
    stream = getattr(data.train, "stream", None)
    total = ((len(stream) - 1) // t.seq_len * t.seq_len if stream is not None else max_tokens)
    total = min(total, max_tokens) if max_tokens else total
    try:
        meta = _write(faiss, partial, data, features, params, t, d, total, max_tokens, step, echo)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-built stays behind
        raise
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    echo(f"datastore of {meta['count']} tokens ({meta['index']}) for step {step} in {final}")
    return meta


def _write(faiss, partial, data, features, params, t, d, total, max_tokens, step, echo) -> dict:
    from tqdm import tqdm

    keys_path, values_path = partial / "keys.f16", partial / "values.i32"
    count = 0
    with open(keys_path, "wb") as keys_file, open(values_path, "wb") as values_file, \
            tqdm(total=total, unit="tok", desc="datastore", file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in windows_of(data, t.batch_size, t.seq_len, max_tokens):
            g = np.asarray(features(params, batch["inputs"]), np.float32).reshape(-1, d)
            real = batch["weights"].reshape(-1) > 0
            take = min(int(real.sum()), total - count) if total else int(real.sum())
            keys_file.write(g[real][:take].astype(np.float16).tobytes())
            values_file.write(batch["targets"].reshape(-1)[real][:take].astype(np.int32).tobytes())
            count += take
            bar.update(take)
            if total and count >= total:
                break
    if count == 0:
        raise DatastoreError("the training split gave no tokens for the datastore")
    keys = np.memmap(keys_path, np.float16, mode="r", shape=(count, d))
    index = _make_index(faiss, keys, echo)
    faiss.write_index(index, str(partial / "index.faiss"))
    meta = {"step": int(step), "count": count, "d_model": d, "index": "flat_ip" if count <= EXACT_MAX else
            f"ivf{index.nlist}_pq{pq_bytes(d)}x{pq_bits(count)}", "nprobe": NPROBE if count > EXACT_MAX else None,
            "keys": "float16", "values": "int32"}
    (partial / "meta.json").write_text(json.dumps(meta, indent=1))  # last: the marker of a complete build
    return meta


def pq_bytes(d: int) -> int:
    """Bytes per PQ code: 64 (the reference's), or the largest count of sub-vectors dividing d below it."""
    return math.gcd(d, PQ_BYTES)


def pq_bits(count: int) -> int:
    """Bits per sub-vector code: 8 (the reference's), fewer for a store too small to train 256 centroids."""
    return max(1, min(8, int(math.log2(max(count, 78) / 39))))


def _make_index(faiss, keys: np.memmap, echo):
    count, d = keys.shape
    if count <= EXACT_MAX:
        index = faiss.IndexFlatIP(d)
    else:
        lists = min(IVF_LISTS, max(1, count // 39))  # faiss wants about 39 training points per centroid
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, lists, pq_bytes(d), pq_bits(count),
                                 faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(count, min(count, TRAIN_KEYS), replace=False)
        echo(f"training IVF-PQ ({lists} lists) on {len(sample)} keys")
        index.train(np.asarray(keys[np.sort(sample)], np.float32))
        index.nprobe = NPROBE
    for start in range(0, count, 65536):
        index.add(np.asarray(keys[start:start + 65536], np.float32))
    return index


class Datastore:
    """A built datastore, opened for search (keys memory-mapped)."""

    def __init__(self, workdir, step: int | None = None):
        root = pathlib.Path(workdir) / DIR_NAME
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise DatastoreError(f"{workdir} has no datastore{' (a build was interrupted)' if (pathlib.Path(workdir) / (DIR_NAME + '.partial')).exists() else ''}. "
                                 f"Fix: python -m scaling_sparse datastore --workdir={workdir}")
        self.meta = json.loads(meta_path.read_text())
        if step is not None and self.meta["step"] != step:
            raise DatastoreError(f"the datastore in {root} holds the keys of step {self.meta['step']}, but step {step} "
                                 f"is evaluated. Fix: rebuild it: python -m scaling_sparse datastore --workdir={workdir}")
        faiss = _faiss()
        self.index = faiss.read_index(str(root / "index.faiss"))
        if hasattr(self.index, "nprobe") and self.meta.get("nprobe"):
            self.index.nprobe = self.meta["nprobe"]
        self.values = np.fromfile(root / "values.i32", np.int32)
        self.keys = np.memmap(root / "keys.f16", np.float16, mode="r", shape=(self.meta["count"], self.meta["d_model"]))

    def search(self, queries: np.ndarray, k: int):
        """queries [n, d] -> (inner products [n, k] float32, values [n, k] int32; -1 where fewer than k)."""
        scores, ids = self.index.search(np.ascontiguousarray(queries, np.float32), min(k, self.meta["count"]))
        return scores, np.where(ids >= 0, self.values[np.maximum(ids, 0)], -1)


def _lse(x, axis=-1):
    """log-sum-exp that gives -inf for a row of -inf (an empty set)."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def knn_token_losses(logits, features, targets, weights, knn_scores, knn_values, *, memory: str, temperature: float,
                     knn_lambda: float, knn_temperature: float) -> np.ndarray:
    """-log p per token (float64 [B, T]) with the datastore's neighbours (module docstring). knn_scores,
    knn_values: [B*T, k] from Datastore.search of the features."""
    b, t, v = logits.shape
    d = features.shape[-1]
    logits = logits.astype(np.float64).reshape(b * t, v)
    y = targets.reshape(-1)
    lp_vocab = logits - _lse(logits)[:, None]
    if memory == "none":
        log_p_model = lp_vocab[np.arange(b * t), y]
    else:  # TrimeLM_ext: the in-batch memory (local or long) and the neighbours in one softmax
        from scaling_sparse.trime_loss import batch_visibility

        g = features.astype(np.float64).reshape(b * t, d)
        scale = 1.0 / (math.sqrt(d) * temperature)
        batch_scores = g @ g.T * scale
        visible = np.asarray(batch_visibility(weights, "long", group_rows=1 if memory == "local" else b))
        visible = visible.reshape(b * t, b * t)
        neighbour = knn_scores.astype(np.float64) * scale
        valid = knn_values >= 0
        all_scores = np.concatenate([logits, np.where(visible, batch_scores, -np.inf),
                                     np.where(valid, neighbour, -np.inf)], axis=1)
        positive = np.concatenate([np.eye(v, dtype=bool)[y], visible & (y[None, :] == y[:, None]),
                                   valid & (knn_values == y[:, None])], axis=1)
        log_p_model = _lse(np.where(positive, all_scores, -np.inf)) - _lse(all_scores)
    valid = knn_values >= 0
    knn = np.where(valid, knn_scores.astype(np.float64) / knn_temperature, -np.inf)
    log_p_knn = _lse(np.where(valid & (knn_values == y[:, None]), knn, -np.inf)) - _lse(knn)
    log_p = np.logaddexp(np.log1p(-knn_lambda) + log_p_model if knn_lambda < 1 else -np.inf,
                         np.log(knn_lambda) + log_p_knn if knn_lambda > 0 else -np.inf)
    return (-log_p).reshape(b, t)


def evaluate(config, workdir, *, step: int | None = None, memory: str = "local", temperature: float = 1.0, k: int = 1024,
             knn_lambda: float = 0.3, knn_temperature: float = 10.5) -> dict:
    """Validation loss with the datastore (TrimeLM_ext with memory local or long, kNN-LM with none), one process."""
    import time

    import jax
    from flax import nnx

    from scaling_sparse import sharding
    from scaling_sparse.train import load_data, load_params

    if memory not in ("none", "local", "long"):
        raise DatastoreError(f"--datastore scores with --memory=local or long (TrimeLM_ext) or none (kNN-LM), not "
                             f"{memory!r} (at evaluation the batch's other windows are later text)")
    if not 0 <= knn_lambda <= 1 or not knn_temperature > 0 or not temperature > 0 or k < 1:
        raise DatastoreError("--knn_lambda must be in [0, 1], --knn_temperature and --memory_temperature > 0, "
                             "--knn_k >= 1")
    mesh = sharding.single_device_mesh()
    graphdef, params, step = load_params(config, workdir, step=step, mesh=mesh)
    store = Datastore(workdir, step)
    data = load_data(config, workdir)

    @jax.jit
    def forward(params, inputs):
        return nnx.merge(graphdef, params)(inputs, features=True)

    loss_sum = weight_sum = 0.0
    search_seconds = 0.0
    for batch in data.eval_batches:
        logits, g = (np.asarray(x, np.float32) for x in forward(params, batch["inputs"]))
        start = time.perf_counter()
        scores, values = store.search(g.reshape(-1, g.shape[-1]), k)
        search_seconds += time.perf_counter() - start
        losses = knn_token_losses(logits, g, batch["targets"], batch["weights"], scores, values, memory=memory,
                                  temperature=temperature, knn_lambda=knn_lambda, knn_temperature=knn_temperature)
        loss_sum += float((losses * batch["weights"]).sum())
        weight_sum += float(batch["weights"].sum())
    loss = loss_sum / max(weight_sum, 1.0)
    return {"step": step, "eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))),
            "eval_tokens": int(weight_sum), "memory": memory, "datastore": {**store.meta, "k": k, "lambda": knn_lambda,
            "knn_temperature": knn_temperature, "memory_temperature": temperature, "search_seconds": search_seconds}}
