"""Sparse output (loss) layers (reference.md §3), following the output protocol of output.py.

MultiplicativeOutput: a multiplicative layer with S = loss_sparsity modules: D [S, d], E [d, vocab/S],
bias [vocab]; logits module-major (logit s*vocab/S + m belongs to module s).
LowRankOutput: Dense(d, r) -> Dense(r, vocab), both with biases as in the reference's LowRankDense.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.dense import Dense
from scaling_sparse.layers.multiplicative import MultiplicativeDense


class MultiplicativeOutput(MultiplicativeDense):
    def __init__(self, d_model: int, vocab_size: int, n_modules: int, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        if n_modules < 1 or vocab_size % n_modules:
            raise ValueError(f"MultiplicativeOutput: vocab_size {vocab_size} is not divisible by loss_sparsity "
                             f"{n_modules}; choose a vocabulary divisible by it (32000 works with 2, 4, 8)")
        super().__init__(d_model, vocab_size, n_modules, rngs=rngs, param_dtype=param_dtype)


class LowRankOutput(nnx.Module):
    def __init__(self, d_model: int, vocab_size: int, rank: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if not 0 < rank <= min(d_model, vocab_size):
            raise ValueError(f"LowRankOutput: rank {rank} must be in 1..min(d_model, vocab_size)="
                             f"{min(d_model, vocab_size)}; set model.loss_lowrank accordingly")
        self.down = Dense(d_model, rank, rngs=rngs, param_dtype=param_dtype)
        self.up = Dense(rank, vocab_size, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.up(self.down(x))

    def params_per_token(self) -> int:
        return self.down.params_per_token() + self.up.params_per_token()
