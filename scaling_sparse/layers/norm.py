"""LayerNorm with statistics in float32 and output in the input's dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.base import param


class LayerNorm(nnx.Module):
    component = "norms"

    def __init__(self, d: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.scale = param(jnp.ones((d,), param_dtype), "norm")
        self.bias = param(jnp.zeros((d,), param_dtype), "norm")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)

    def params_per_token(self) -> int:
        return self.scale.size + self.bias.size
