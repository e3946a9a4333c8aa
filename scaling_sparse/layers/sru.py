"""SRU recurrence in the feed-forward sub-layer (Terraformer, docs/semantics.md §4).

FFN(x) = FFN_main(x) + Dense_d(SRU(Dense_units(LN'(x)))), with the SRU of Lei et al. as Trax writes
it (`tl.SRU`): [r, f, y] = x W + b; r, f = sigmoid; c_t = f_t c_{t-1} + (1 - f_t) y_t;
h_t = c_t r_t + x_t (1 - r_t) sqrt(3). The recurrence is linear in c, so the full pass is one
`jax.lax.associative_scan` (log-depth, no Python or scan loop per position); decoding keeps c as
its state, so a step costs O(units^2) whatever the position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.base import param_count
from scaling_sparse.layers.dense import Dense
from scaling_sparse.layers.norm import LayerNorm


def linear_recurrence(a: jax.Array, b: jax.Array, c0: jax.Array) -> jax.Array:
    """c_t = a_t * c_{t-1} + b_t over axis 1 (a, b [batch, T, n]; c0 [batch, n]) -> c [batch, T, n]."""

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, a_r * b_l + b_r

    a_cum, b_cum = jax.lax.associative_scan(combine, (a, b), axis=1)
    return a_cum * c0[:, None, :] + b_cum


class SRU(nnx.Module):
    """Simple recurrent unit on `units` features; state = the cell c [batch, units]."""

    component = "ffn"

    def __init__(self, units: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.units = units
        self.proj = Dense(units, 3 * units, rngs=rngs, axes=("sru", "sru"), param_dtype=param_dtype)

    def _scan(self, x, c0):
        r, f, y = jnp.split(self.proj(x), 3, axis=-1)
        r, f = jax.nn.sigmoid(r), jax.nn.sigmoid(f)
        # The recurrence runs in float32 whatever the compute dtype: it accumulates over the sequence.
        c = linear_recurrence(f.astype(jnp.float32), ((1.0 - f) * y).astype(jnp.float32), c0.astype(jnp.float32))
        h = c.astype(x.dtype) * r + x * (1.0 - r) * jnp.sqrt(3.0).astype(x.dtype)
        return h, c[:, -1]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._scan(x, jnp.zeros((x.shape[0], self.units), jnp.float32))[0]

    def init_cache(self, batch: int, cache_len: int = 0, dtype=None):
        return jnp.zeros((batch, self.units), jnp.float32)

    def decode(self, x: jax.Array, c: jax.Array, index=None):
        """x [batch, T, units] continuing from state c -> (h, new state)."""
        return self._scan(x, c)

    def params_per_token(self) -> int:
        return self.proj.params_per_token()


class SRUFeedForward(nnx.Module):
    """The main FFN plus a parallel low-width recurrent branch, both on the RAW residual stream, each
    with its own LayerNorm: FFN(x) = main(LN x) + Dense_d(SRU(Dense_units(LN' x))) (trax terraformer.py;
    docs/semantics.md §4). The block therefore gives this sub-layer the stream, not LN(stream)
    (`takes_raw_stream`)."""

    component = "ffn"
    takes_raw_stream = True

    def __init__(self, main: nnx.Module, d_model: int, units: int, *, rngs: nnx.Rngs, eps: float = 1e-6,
                 param_dtype=jnp.float32):
        if units <= 0:
            raise ValueError(f"SRU units must be > 0, got {units}: set model.ff_sru_units (0 disables the SRU)")
        self.main_norm = LayerNorm(d_model, eps=eps, param_dtype=param_dtype)
        self.main = main
        self.sru_norm = LayerNorm(d_model, eps=eps, param_dtype=param_dtype)
        self.sru_in = Dense(d_model, units, rngs=rngs, axes=("embed", "sru"), param_dtype=param_dtype)
        self.sru = SRU(units, rngs=rngs, param_dtype=param_dtype)
        self.sru_out = Dense(units, d_model, rngs=rngs, axes=("sru", "embed"), param_dtype=param_dtype)

    def _branch_input(self, x):
        return self.sru_in(self.sru_norm(x))

    def __call__(self, x: jax.Array, *, mode: str = "eval", rng=None, **main_kwargs) -> jax.Array:
        """x: the raw stream. main_kwargs reach the main FFN (the sparse FFN's `choice`, layers/reversible.py)."""
        y = self.main(self.main_norm(x), mode=mode, rng=rng, **main_kwargs)
        return y + self.sru_out(self.sru(self._branch_input(x)))

    def train_choice(self, x: jax.Array, rng):
        """The main sparse FFN's training choice for the raw stream x (layers/reversible.py)."""
        return self.main.train_choice(self.main_norm(x), rng)

    def init_cache(self, batch: int, cache_len: int, dtype):
        return {"main": self.main.init_cache(batch, cache_len, dtype), "sru": self.sru.init_cache(batch, cache_len, dtype)}

    def decode(self, x, cache, index):
        y, main_cache = self.main.decode(self.main_norm(x), cache["main"], index)
        h, c = self.sru.decode(self._branch_input(x), cache["sru"], index)
        return y + self.sru_out(h), {"main": main_cache, "sru": c}

    def params_per_token(self) -> int:
        branch = param_count(self.sru_norm) + self.sru_in.params_per_token() + self.sru.params_per_token()
        return param_count(self.main_norm) + self.main.params_per_token() + branch + self.sru_out.params_per_token()
