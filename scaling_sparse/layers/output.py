"""Output (loss) layers: d_model -> vocab logits. Dense here; sparse variants in their own files.

Output protocol: out(x) -> logits [..., vocab]; out.params_per_token(). Decoding uses the same call.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.dense import Dense


class DenseOutput(Dense):
    def __init__(self, d_model: int, vocab_size: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        super().__init__(d_model, vocab_size, rngs=rngs, param_dtype=param_dtype)
