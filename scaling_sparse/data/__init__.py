"""Corpora -> tokenizer -> packed batches.

The training loop calls one function: `scaling_sparse.data.pipeline.build_data(config, workdir)`.
Files by concern:
  corpus.py     the embedded stdlib corpus, local text files and JSONL; the train/validation split
  tokenizer.py  SentencePiece: train on the training split, cache, load a given .model
  packing.py    documents joined with eos, fixed-length windows, the resumable shuffled iterator
  cache.py      atomic writes and content fingerprints for everything cached under WORKDIR
  tfds_c4.py    C4 from tensorflow-datasets (the only module that imports TensorFlow, lazily)
  pipeline.py   build_data: dispatch on config.data.source and assemble the above
"""

from scaling_sparse.config import ConfigError


class DataError(ConfigError):
    """A corpus, tokenizer or iterator-state problem; the message names the cause and the fix."""
