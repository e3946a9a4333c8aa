"""build_data(config, workdir): the one entry point into the data, a dispatcher over the leaves.

    data = build_data(config, workdir, process_index=0, process_count=1)
    data.tokenizer.encode(text) / .decode(ids) / .vocab_size / .pad_id (0) / .eos_id (1)
    next(data.train) -> {"inputs": int32 [b, L], "targets": int32 [b, L], "weights": float32 [b, L]}
                        with b = batch_size / process_count: this process's rows of the global batch
                        and L = train.seq_len (config.data.objective="lm": targets = inputs shifted)
    config.data.objective="span_corruption" (T5, span_corruption.py; for model.arch="encdec"):
    next(data.train) -> {"inputs": int32 [b, Li]            corrupted text, a sentinel per noise span, eos
                         "decoder_inputs": int32 [b, Lt]    targets shifted right, starting with 0
                         "targets": int32 [b, Lt]           sentinel, span tokens, ..., eos
                         "weights": float32 [b, Lt]}        1 on target tokens (incl. eos), 0 on padding
                        with Li = train.inputs_len, Lt = train.seq_len, all padded with 0;
                        data.tokenizer.sentinel_ids[i] = id of <extra_id_i> (vocab_size - 1 - i)
    data.train.get_state() / .set_state(state)   JSON-serialisable; saved with each checkpoint
    data.eval_batches                              deterministic validation batches (this process's rows,
                                                   the same layout as the training batches)
    data.stats                                     counts for logging

The path is straight: corpus (corpus.py, or tfds_c4.py for C4) -> tokenizer (tokenizer.py) ->
packed batches (packing.py) or span-corruption examples (span_corruption.py) -> resumable iterator.
Leaf modules never import this one.
"""

from __future__ import annotations

from scaling_sparse import storage
from scaling_sparse.data import Data, DataError


def build_data(config, workdir, *, process_index: int = 0, process_count: int = 1) -> Data:
    """Builds tokenizer, training iterator and validation batches for the validated config."""
    workdir = storage.path(workdir)
    if not storage.is_object_store(workdir):
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
