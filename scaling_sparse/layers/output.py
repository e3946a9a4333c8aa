"""Output (loss) layers: d_model -> vocab logits. Dense here; sparse variants in their own files.

Output protocol (layers/base.py): out(x) -> logits [..., vocab]; out.decode(x, cache, index) ->
(logits, cache) with an empty cache; out.params_per_token().
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.base import no_cache
from scaling_sparse.layers.dense import Dense


class OutputLayer:
    """Mixin: an output layer keeps no decode state and decodes with its full call."""

    component = "output"
    init_cache = staticmethod(no_cache)

    def decode(self, x, cache, index):
        return self(x), cache


class DenseOutput(OutputLayer, Dense):
    def __init__(self, d_model: int, vocab_size: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        super().__init__(d_model, vocab_size, rngs=rngs, axes=("embed", "vocab"), param_dtype=param_dtype)
