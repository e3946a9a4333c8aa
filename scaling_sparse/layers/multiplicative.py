"""The multiplicative (factored) dense layer and the module convolution of sparse QKV (docs/semantics.md §2).

MultiplicativeDense: `y[s, m] = sum_i x_i D[s, i] E[i, m] + bias[s*M + m]`, output module-major
(S modules of M = d_out / S units). d_in*S + d_in*M weights instead of d_in*d_out.

ModuleConv: the output of a multiplicative layer viewed as [batch, length, S, M] and convolved with
length as height and modules as width (M channels in and out, weights shared across modules):
causal on the length axis (the caller supplies the kl-1 previous rows: zeros for a full sequence, the
decode cache when decoding) and zero-padded by (ks-1)/2 on each side of the module axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.base import param
from scaling_sparse.layers.dense import tiny_normal
from scaling_sparse.quantize import matmul
from scaling_sparse.sharding import constrain

glorot_uniform = nnx.initializers.glorot_uniform()


class MultiplicativeDense(nnx.Module):
    # int8 (quantize.py): a scale per module row of the gates, per output channel of the shared kernel.
    INT8_AXES = {"gates": (1,), "kernel": (0,)}

    def __init__(self, d_in: int, d_out: int, n_modules: int, *, rngs: nnx.Rngs, out_axis: str = "heads",
                 use_bias: bool = True, param_dtype=jnp.float32):
        if n_modules < 1 or d_out % n_modules:
            raise ValueError(f"MultiplicativeDense: d_out {d_out} is not divisible by n_modules {n_modules}; "
                             "choose a number of modules dividing the output width")
        self.d_in, self.d_out, self.n_modules = d_in, d_out, n_modules
        self.d_module = d_out // n_modules
        # D ~ N(0, 0.5^2) (the reference's gating vectors), E Glorot-uniform, bias N(0, 1e-6^2).
        # One draw from the Rngs stream per layer (each draw is costly under nnx.eval_shape), split here.
        keys = jax.random.split(rngs.params(), 3)
        self.gates = param(nnx.initializers.normal(0.5)(keys[0], (n_modules, d_in), param_dtype), "modules", "embed")
        self.kernel = param(glorot_uniform(keys[1], (d_in, self.d_module), param_dtype), "embed", "module_units")
        self.bias = param(tiny_normal(keys[2], (d_out,), param_dtype), out_axis) if use_bias else None

    def modules(self, x: jax.Array) -> jax.Array:
        """x [..., d_in] -> [..., S, M] (before the bias). Two orders of the same sums, chosen by shape:
        with more tokens than M (training, eval) the per-module weights D[s, i] E[i, m] are built
        once ([S, d_in, M], the size of a dense d_in x d_out layer) and applied as one matmul, so the
        gate gradient reduces over that weight, not over a [tokens, S, d_in] product (on the CPU at
        the medium size that reduction took 15% of a sparse train step); with few tokens (decoding)
        the input is gated per module, reading d_in (S + M) weights instead of S d_in M."""
        gates, kernel = self.gates[...].astype(x.dtype), self.kernel[...].astype(x.dtype)
        if math.prod(x.shape[:-1]) > self.d_module:
            return jnp.einsum("...i,sim->...sm", x, gates[:, :, None] * kernel[None])
        gated = x[..., None, :] * gates                                  # [..., S, d_in]
        return matmul(gated, self.kernel)                                # [..., S, M] (int8: quantize.py)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.modules(x).reshape(*x.shape[:-1], self.d_out)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y

    def params_per_token(self) -> int:
        return self.gates.size + self.kernel.size + (0 if self.bias is None else self.bias.size)


class ModuleConv(nnx.Module):
    """2-D convolution over (length, modules) with M channels in and out; causal along length."""

    INT8_AXES = {"kernel": (0, 1, 2)}  # int8: one scale per output channel of the [kl, ks, M, M] kernel

    def __init__(self, n_modules: int, d_module: int, *, length_kernel: int = 3, module_kernel: int = 3,
                 rngs: nnx.Rngs, init: str = "reference", param_dtype=jnp.float32):
        if module_kernel % 2 != 1:
            raise ValueError(f"ModuleConv: module_kernel must be odd (zero padding (ks-1)/2 each side), "
                             f"got {module_kernel}")
        if length_kernel < 1:
            raise ValueError(f"ModuleConv: length_kernel must be >= 1, got {length_kernel}")
        self.n_modules, self.d_module = n_modules, d_module
        self.length_kernel, self.module_kernel = length_kernel, module_kernel
        shape = (length_kernel, module_kernel, d_module, d_module)  # HWIO
        kernel_key, bias_key = jax.random.split(rngs.params())
        # init (model.conv_init), docs/semantics.md §2: "reference" = Glorot-normal whose fans are the
        # last two dimensions only (trax initializers.py `_GetFans` ignores the receptive field): std
        # sqrt(2 / (M + M)) = 1/sqrt(M); "receptive_field" = Glorot-uniform with fans kl ks M (std
        # 1/sqrt(kl ks M), 3x smaller for Q and K at kl = ks = 3).
        if init == "reference":
            kernel = (1.0 / d_module) ** 0.5 * jax.random.normal(kernel_key, shape, param_dtype)
        else:
            kernel = glorot_uniform(kernel_key, shape, param_dtype)
        self.kernel = param(kernel, None, None, "conv", "conv")
        self.bias = param(tiny_normal(bias_key, (d_module,), param_dtype), "conv")

    @property
    def history(self) -> int:
        """How many previous positions one output needs (the decode cache length)."""
        return self.length_kernel - 1

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [b, history + T, S, M] (the first `history` rows are past context) -> [b, T, S, M]."""
        # Each module's ks neighbours (zeros past the edges) become its input channels, and the
        # length taps are kl matmuls of the shifted rows with the kernel's [ks*M, M] slices: the same
        # weights and sums as the 2-D convolution. Matmuls, not XLA's convolution: on a sharded mesh
        # XLA's partitioner doubled the kernel gradient of the module-padded convolution inside the
        # reversible stack's scan (tests/test_sharding.py). On the CPU, at the stdlib shapes
        # ([16, 128, 4, 64], kernel (3, 3)), forward 5.0 ms against the convolution's 4.8, forward and
        # backward 30 against 25, and one decode step 32 us against 70.
        x = constrain(x, "batch", None, None, None)
        half = (self.module_kernel - 1) // 2
        padded = jnp.pad(x, ((0, 0), (0, 0), (half, half), (0, 0))) if half else x
        length = x.shape[1] - self.history
        if length == 1:
            # Decoding one token: every (length tap, module neighbour) pair becomes input channels of
            # one matmul with the whole kernel viewed as [kl*ks*M, M] (a free reshape). Per-tap
            # matmuls made XLA's CPU backend copy each [ks*M, M] kernel slice and run kl small dots:
            # 9 dots and 9 weight copies per sparse-QKV layer instead of 3 dots (docs/benchmarks.md,
            # "Decode at the memory floor").
            taps = jnp.concatenate([padded[:, i:i + 1, j:j + self.n_modules] for i in range(self.length_kernel)
                                    for j in range(self.module_kernel)], axis=-1)
            kernel = self.kernel.get_value().reshape(-1, self.d_module)  # float or int8 (quantize.py)
            y = matmul(taps, kernel)
        else:
            neighbours = jnp.concatenate([padded[:, :, j:j + self.n_modules] for j in range(self.module_kernel)],
                                         axis=-1)
            kernel = self.kernel[...].astype(x.dtype).reshape(self.length_kernel, self.module_kernel * self.d_module,
                                                              self.d_module)
            y = sum(neighbours[:, i:i + length] @ kernel[i] for i in range(self.length_kernel))
        return constrain(y + self.bias[...].astype(x.dtype), "batch", None, None, None)

    def params_per_token(self) -> int:
        return self.kernel.size + self.bias.size
