"""Prefix-LM examples: an input segment before the target, loss on the target only.

This is the Terraformer's encoder-decoder without cross-attention (docs/semantics.md §4): one decoder
reads `input eos target eos`, and only the target tokens (and the closing eos) carry loss weight.
Examples come from JSONL records with `config.data.input_field` and `config.data.target_field`.
They are packed like plain documents; a parallel loss-mask stream marks which tokens are targets,
so packing.PackedIterator / eval_batches cut the weights with the same windows as the tokens.
"""

from __future__ import annotations

import numpy as np

from scaling_sparse.data import packing


def encode_examples(tokenizer, pairs) -> tuple[np.ndarray, np.ndarray]:
    """[(input, target)] -> (token stream, uint8 loss mask of the same length).

    mask[j] = 1 where stream[j] is a target token or the target's closing eos; the eos separating
    input and target is not a target, so predicting the first target token from it is.
    """
    flat = tokenizer.encode_batch([s for pair in pairs for s in pair])
    token_lists, mask_lists = [], []
    for inputs, targets in zip(flat[0::2], flat[1::2]):
        token_lists += [inputs, targets]
        mask_lists += [np.zeros(len(inputs)), np.ones(len(targets))]
    stream = packing.join_documents(token_lists, tokenizer.eos_id, tokenizer.vocab_size)
    # join_documents puts one eos after each piece: 0 after the input, 1 after the target.
    mask = packing.join_documents(mask_lists, 0, 2).astype(np.uint8)
    mask[np.cumsum([len(m) + 1 for m in mask_lists])[1::2] - 1] = 1
    return stream, mask


def texts_of(pairs) -> list[str]:
    """All strings of the examples, inputs and targets (what the tokenizer is trained on)."""
    return [s for pair in pairs for s in pair if s]
