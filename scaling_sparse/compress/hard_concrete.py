"""The hard-concrete distribution (Louizos, Welling, Kingma 2018, "Learning Sparse Neural Networks
through L0 Regularization"), as CoFi uses it for its masks (docs/compression.md): a stretched,
clipped binary-concrete variable z in [0, 1] that is exactly 0 or 1 with positive probability, with a
differentiable probability of being non-zero (the expected L0 norm)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BETA = 2.0 / 3.0              # temperature
LIMIT_L, LIMIT_R = -0.1, 1.1  # stretch interval
EPS = 1e-6
DETERMINISTIC_SHARPNESS = 0.8  # CoFi's eval-time soft mask: sigmoid(log_alpha / beta * 0.8)


def init_log_alpha(shape, droprate: float) -> np.ndarray:
    """log_alpha for an initial drop probability (CoFi: log(1 - p) - log(p))."""
    return np.full(shape, math.log(1.0 - droprate) - math.log(droprate), np.float32)


def sample(log_alpha: jax.Array, key: jax.Array) -> jax.Array:
    """z ~ hard-concrete(log_alpha), reparameterised (differentiable in log_alpha)."""
    u = jax.random.uniform(key, log_alpha.shape, minval=EPS, maxval=1.0 - EPS)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
    return jnp.clip(s * (LIMIT_R - LIMIT_L) + LIMIT_L, 0.0, 1.0)


def prob_nonzero(log_alpha: jax.Array) -> jax.Array:
    """P(z != 0) = 1 - Q(s <= 0), the expected L0 contribution of each mask entry."""
    return jax.nn.sigmoid(log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))


def deterministic(log_alpha) -> np.ndarray:
    """CoFi's eval-time mask of one group: soft values sigmoid(log_alpha / beta * 0.8), with the
    expected number of zeros, size - round(sum P(z != 0)), of the smallest set to exactly 0."""
    log_alpha = np.asarray(log_alpha, np.float64)
    n_zeros = log_alpha.size - int(round(float(np.asarray(prob_nonzero(jnp.asarray(log_alpha))).sum())))
    soft = 1.0 / (1.0 + np.exp(-log_alpha / BETA * DETERMINISTIC_SHARPNESS))
    if n_zeros > 0:
        flat = soft.reshape(-1)
        flat[np.argsort(flat, kind="stable")[:n_zeros]] = 0.0
        soft = flat.reshape(log_alpha.shape)
    return soft.astype(np.float32)
