"""Dense Q, K, V projections: one fused [d, 3d] matrix, so decoding reads it in one pass.

Follows the decode protocol of layers/base.py (sparse_qkv.py too):
  qkv(x) -> (q, k, v), each [batch, T, d_model];
  qkv.init_cache(batch, cache_len, dtype); qkv.decode(x, cache, index) -> ((q, k, v), cache);
  qkv.params_per_token().
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.base import no_cache
from scaling_sparse.layers.dense import Dense


class DenseQKV(nnx.Module):
    component = "attention"

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.proj = Dense(d_model, 3 * d_model, rngs=rngs, axes=("embed", "heads"), param_dtype=param_dtype)

    def __call__(self, x: jax.Array):
        q, k, v = jnp.split(self.proj(x), 3, axis=-1)
        return q, k, v

    init_cache = staticmethod(no_cache)

    def decode(self, x: jax.Array, cache, index):
        return self(x), cache

    def params_per_token(self) -> int:
        return self.proj.params_per_token()
