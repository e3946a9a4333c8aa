"""Plain dense (affine) layer that computes in its input's dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.base import param

glorot_uniform = nnx.initializers.glorot_uniform()


def tiny_normal(key, shape, dtype=jnp.float32):
    """N(0, 1e-6^2): the reference's bias initialisation."""
    return 1e-6 * jax.random.normal(key, shape, dtype)


class Dense(nnx.Module):
    """x [..., d_in] @ kernel [d_in, d_out] + bias; `axes` are the kernel's logical axis names."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes: tuple[str | None, str | None],
                 use_bias: bool = True, kernel_init=glorot_uniform, param_dtype=jnp.float32):
        kernel_key, bias_key = jax.random.split(rngs.params())  # one draw from the stream per layer
        self.kernel = param(kernel_init(kernel_key, (d_in, d_out), param_dtype), *axes)
        # Biases N(0, 1e-6^2) as the reference's Dense (docs/semantics.md §5b).
        self.bias = param(tiny_normal(bias_key, (d_out,), param_dtype), axes[1]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y

    def params_per_token(self) -> int:
        return self.kernel.size + (0 if self.bias is None else self.bias.size)
