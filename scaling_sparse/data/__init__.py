"""Corpora -> tokenizer -> packed batches.

The training loop calls one function: `scaling_sparse.data.pipeline.build_data(config, workdir)`.
Files by concern (leaves import this package and each other, never pipeline.py):
  corpus.py     the embedded stdlib corpus, local text files and JSONL; the train/validation split
  tokenizer.py  SentencePiece: train on the training split, cache, load a given .model; the run's tokenizer
                (and its <extra_id_i> sentinels for span corruption)
  packing.py    documents joined with eos, fixed-length windows, the resumable shuffled iterator
  span_corruption.py  T5 span corruption (config.data.objective="span_corruption"): noise masks,
                sentinels, encoder-decoder batches {"inputs", "decoder_inputs", "targets", "weights"}
  cache.py      atomic writes and content fingerprints for everything cached under WORKDIR
  tfds_c4.py    C4 from tensorflow-datasets (the only module that imports TensorFlow, lazily)
  grain_rows.py TFDS ArrayRecord through Grain (tfds_reader=grain): per-process row streams, O(1) resume
  consecutive.py  TRIME_long's batches of consecutive segments (train.trime.memory=long)
  bm25_batches.py TRIME_ext's batches of BM25-similar segments (train.trime.memory=ext)
  local.py      stdlib / files / jsonl assembled into Data (token-stream cache under WORKDIR)
  pipeline.py   build_data: dispatch on config.data.source
"""

from __future__ import annotations

import dataclasses
from typing import Any

from scaling_sparse.config import ConfigError


class DataError(ConfigError):
    """A corpus, tokenizer or iterator-state problem; the message names the cause and the fix."""


@dataclasses.dataclass
class Data:
    tokenizer: Any        # tokenizer.Tokenizer
    train: Any            # packing.PackedIterator | tfds_c4.StreamIterator | span_corruption.*Iterator:
                          # next(), get_state(), set_state()
    eval_batches: list
    stats: dict
