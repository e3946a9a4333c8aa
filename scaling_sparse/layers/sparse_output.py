"""Sparse output (loss) layers (docs/semantics.md §3), following the output protocol of output.py.

MultiplicativeOutput: a multiplicative layer with S = loss_sparsity modules: D [S, d], E stored
[vocab/S, d] (row m = the weights of unit m), bias [vocab]; logits unit-major: logit m*S + s is
unit m of module s. Which logit stands for which token is a convention (a fixed permutation of the
vocabulary, learned through); this one makes decoding E [vocab/S, d] x (gated x)^T [d, S], a product
that streams E once at memory speed. Module-major logits (E as [d, vocab/S], or a transpose after
the product) made XLA's CPU backend run a [S, d] x [d, vocab/S] dot at about a quarter of the
memory bandwidth: 4-5 ms per token at the medium size instead of about 1.5 (benchmarks/).
LowRankOutput: Dense(d, r) -> Dense(r, vocab), both with biases as in the reference's LowRankDense.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.base import param
from scaling_sparse.layers.dense import Dense
from scaling_sparse.layers.multiplicative import MultiplicativeDense
from scaling_sparse.layers.output import OutputLayer
from scaling_sparse.quantize import is_int8, matmul


class MultiplicativeOutput(OutputLayer, MultiplicativeDense):
    INT8_AXES = {"gates": (1,), "kernel": (1,)}  # int8: the unit-major kernel [vocab/S, d] gets a scale per row

    def __init__(self, d_model: int, vocab_size: int, n_modules: int, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        if n_modules < 1 or vocab_size % n_modules:
            raise ValueError(f"MultiplicativeOutput: vocab_size {vocab_size} is not divisible by loss_sparsity "
                             f"{n_modules}; choose a vocabulary divisible by it (32000 works with 2, 4, 8)")
        super().__init__(d_model, vocab_size, n_modules, rngs=rngs, out_axis="vocab", param_dtype=param_dtype)
        # Glorot-uniform is symmetric in fan-in and fan-out: the transpose has the same distribution.
        self.kernel = param(self.kernel[...].T, "vocab", "embed")  # [vocab/S, d]

    def modules(self, x: jax.Array) -> jax.Array:
        """x [..., d] -> [..., vocab/S, S] (before the bias): unit-major, see the module docstring."""
        gated = x[..., None, :] * self.gates[...].astype(x.dtype)        # [..., S, d]
        if is_int8(self.kernel):  # [..., S, vocab/S] from the int8 rows (quantize.matmul), then unit-major
            return jnp.swapaxes(matmul(gated, self.kernel, transposed=True), -1, -2)
        return jnp.einsum("...sd,md->...ms", gated, self.kernel[...].astype(x.dtype))


class LowRankOutput(OutputLayer, nnx.Module):
    def __init__(self, d_model: int, vocab_size: int, rank: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if not 0 < rank <= min(d_model, vocab_size):
            raise ValueError(f"LowRankOutput: rank {rank} must be in 1..min(d_model, vocab_size)="
                             f"{min(d_model, vocab_size)}; set model.loss_lowrank accordingly")
        self.down = Dense(d_model, rank, rngs=rngs, axes=("embed", "lowrank"), param_dtype=param_dtype)
        self.up = Dense(rank, vocab_size, rngs=rngs, axes=("lowrank", "vocab"), param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.up(self.down(x))

    def params_per_token(self) -> int:
        return self.down.params_per_token() + self.up.params_per_token()
