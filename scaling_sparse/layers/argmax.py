"""argmax as two single-output reductions, for decoding on the CPU.

`jnp.argmax` lowers to one variadic (value, index) reduction, which XLA's CPU backend runs as a scalar
loop: at the medium size the sparse FFN's choice over [96 blocks, 64 units] took ~25 us per layer and
greedy sampling over 32000 logits ~150 us per token (benchmarks/profile_decode.py, docs/benchmarks.md,
"Decode at the memory floor"). A max, then the smallest index holding it, are two plain reductions
that vectorise. Same result as jnp.argmax, ties included (the first maximal index); inputs must be
free of NaN (logits are).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def first_argmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """The index of the first maximum along `axis` (int32), as jnp.argmax."""
    axis = axis % x.ndim
    top = jnp.max(x, axis=axis, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    return jnp.min(jnp.where(x == top, iota, x.shape[axis]), axis=axis)
