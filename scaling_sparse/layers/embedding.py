"""The initial values of the token and positional embeddings, shared by every model in models/."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sinusoidal_init(max_len: int, d: int) -> np.ndarray:
    pos = np.arange(max_len)[:, None]
    inv = np.exp(-np.log(10000.0) * np.arange(0, d, 2) / d)
    table = np.zeros((max_len, d), np.float32)
    table[:, 0::2] = np.sin(pos * inv)
    table[:, 1::2] = np.cos(pos * inv)[:, : d // 2]
    return table


def embedding_init(key, shape, dtype=jnp.float32, kind: str = "reference"):
    """model.embed_init: "reference" = U(-a, a) with a = sqrt(3 / d), std 1/sqrt(d), the reference's
    token embedding; "normal" = N(0, 1)."""
    if kind == "normal":
        return jax.random.normal(key, shape, dtype)
    limit = (3.0 / shape[-1]) ** 0.5
    return jax.random.uniform(key, shape, dtype, -limit, limit)
