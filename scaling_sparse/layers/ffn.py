"""Dense ReLU feed-forward: Dense(d, f) -> ReLU -> dropout -> Dense(f, d)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.base import check_mode, no_cache
from scaling_sparse.layers.dense import make_linear
from scaling_sparse.layers.dropout import dropout


class DenseFF(nnx.Module):
    component = "ffn"

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, dropout_rate: float = 0.0,
                 param_dtype=jnp.float32, rank: int = 0):
        # rank > 0: each matrix as two rank-r factors (SVD / ASVD, docs/compression.md).
        self.w_in = make_linear(d_model, d_ff, rank=rank, rngs=rngs, axes=("embed", "mlp"), param_dtype=param_dtype)
        self.w_out = make_linear(d_ff, d_model, rank=rank, rngs=rngs, axes=("mlp", "embed"), param_dtype=param_dtype)
        self.dropout_rate = dropout_rate

    def __call__(self, x: jax.Array, *, mode: str = "eval", rng=None) -> jax.Array:
        train = check_mode(mode)
        h = jax.nn.relu(self.w_in(x))
        h = dropout(h, self.dropout_rate, rng, train=train)
        return self.w_out(h)

    init_cache = staticmethod(no_cache)

    def decode(self, x, cache, index):
        return self(x), cache

    def params_per_token(self) -> int:
        return self.w_in.params_per_token() + self.w_out.params_per_token()
