"""build_data(config, workdir): the one entry point into the data, a dispatcher over the leaves.

    data = build_data(config, workdir, process_index=0, process_count=1)
    data.tokenizer.encode(text) / .decode(ids) / .vocab_size / .pad_id (0) / .eos_id (1)
    next(data.train) -> {"inputs": int32 [b, L], "targets": int32 [b, L], "weights": float32 [b, L]}
                        with b = batch_size / process_count: this process's rows of the global batch
    data.train.get_state() / .set_state(state)   JSON-serialisable; saved with each checkpoint
    data.eval_batches                              deterministic validation batches (this process's rows)
    data.stats                                     counts for logging

The path is straight: corpus (corpus.py, or tfds_c4.py for C4) -> tokenizer (tokenizer.py) ->
packed batches (packing.py) -> resumable iterator. Leaf modules never import this one.
"""

from __future__ import annotations

import pathlib

from scaling_sparse.data import Data, DataError


def build_data(config, workdir, *, process_index: int = 0, process_count: int = 1) -> Data:
    """Builds tokenizer, training iterator and validation batches for the validated config."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.train.batch_size % process_count:
        raise DataError(f"config.train.batch_size {config.train.batch_size} is not divisible by the "
                        f"{process_count} processes. Fix: use a multiple of {process_count}")
    if config.data.source == "tfds":
        from scaling_sparse.data import tfds_c4  # TensorFlow only on this path

        return tfds_c4.build_data(config, workdir, process_index, process_count)
    if config.data.source in ("stdlib", "files", "jsonl"):
        from scaling_sparse.data import local

        return local.build_data(config, workdir, process_index, process_count)
    raise DataError(f"config.data.source={config.data.source!r} is unknown. Fix: use stdlib | files | jsonl | tfds.")
