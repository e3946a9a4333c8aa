"""Plain dense (affine) layer that computes in its input's dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.base import param
from scaling_sparse.quantize import matmul

glorot_uniform = nnx.initializers.glorot_uniform()


def tiny_normal(key, shape, dtype=jnp.float32):
    """N(0, 1e-6^2): the reference's bias initialisation."""
    return 1e-6 * jax.random.normal(key, shape, dtype)


class Dense(nnx.Module):
    """x [..., d_in] @ kernel [d_in, d_out] + bias; `axes` are the kernel's logical axis names."""

    INT8_AXES = {"kernel": (0,)}  # int8: one scale per output channel (quantize.py)

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes: tuple[str | None, str | None],
                 use_bias: bool = True, kernel_init=glorot_uniform, param_dtype=jnp.float32):
        kernel_key, bias_key = jax.random.split(rngs.params())  # one draw from the stream per layer
        self.kernel = param(kernel_init(kernel_key, (d_in, d_out), param_dtype), *axes)
        # Biases N(0, 1e-6^2) as the reference's Dense (docs/semantics.md §5b).
        self.bias = param(tiny_normal(bias_key, (d_out,), param_dtype), axes[1]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x, self.kernel)  # float or int8 (quantize.py)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y

    def params_per_token(self) -> int:
        return self.kernel.size + (0 if self.bias is None else self.bias.size)


class LowRankDense(nnx.Module):
    """x @ a [d_in, r] @ b [r, d_out] + bias: a dense layer stored as two rank-r factors (SVD / ASVD
    compression, docs/compression.md). Reads r (d_in + d_out) + d_out parameters per token instead of
    d_in d_out + d_out. Freshly built, both factors are Glorot-uniform; `compress` fills them from a
    trained model's matrices."""

    INT8_AXES = {"a": (0,), "b": (0,)}  # int8: one scale per output channel of each factor

    def __init__(self, d_in: int, d_out: int, rank: int, *, rngs: nnx.Rngs, axes: tuple[str | None, str | None],
                 use_bias: bool = True, param_dtype=jnp.float32):
        a_key, b_key, bias_key = jax.random.split(rngs.params(), 3)
        # The rank dimension is small and unsharded; each factor keeps its outer dimension's axis name.
        self.a = param(glorot_uniform(a_key, (d_in, rank), param_dtype), axes[0], None)
        self.b = param(glorot_uniform(b_key, (rank, d_out), param_dtype), None, axes[1])
        self.bias = param(tiny_normal(bias_key, (d_out,), param_dtype), axes[1]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(matmul(x, self.a), self.b)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y

    def params_per_token(self) -> int:
        return self.a.size + self.b.size + (0 if self.bias is None else self.bias.size)


def make_linear(d_in: int, d_out: int, *, rank: int = 0, rngs: nnx.Rngs, axes, kernel_init=glorot_uniform,
                param_dtype=jnp.float32) -> nnx.Module:
    """Dense, or LowRankDense when `rank` > 0 (model.factor_rank_attn / factor_rank_ff)."""
    if rank:
        return LowRankDense(d_in, d_out, rank, rngs=rngs, axes=axes, param_dtype=param_dtype)
    return Dense(d_in, d_out, rngs=rngs, axes=axes, kernel_init=kernel_init, param_dtype=param_dtype)
