"""Dropout driven by an explicit key (so a reversible recomputation can replay it exactly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout(x: jax.Array, rate: float, rng, *, train: bool, broadcast_dims: tuple = ()) -> jax.Array:
    """Inverted dropout; `broadcast_dims` share one mask along those axes (e.g. the sequence)."""
    if not train or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout in train mode needs an rng key")
    shape = tuple(1 if i in broadcast_dims else s for i, s in enumerate(x.shape))
    keep = jax.random.bernoulli(rng, 1.0 - rate, shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
