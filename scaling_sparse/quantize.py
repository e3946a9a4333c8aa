"""Weight-only int8 for decoding and evaluation (docs/quantization.md): symmetric, one float32 scale per row.

A quantised weight is an `Int8Weight` (int8 values and their scales) held as the parameter's value.
Layers read weights as `self.kernel[...]`, which for an Int8Weight gives the dequantised float32 array,
so every layer and model variant runs unchanged on the pure-JAX path (any backend); a decode path that
reads int8 directly asks `is_int8` and takes the values and scales (sparse_ffn.py gathers int8 rows).

Which rows share a scale is the layer's choice, stated by its class attribute `INT8_AXES` (parameter name
-> the axes reduced into one scale): per output channel for dense matrices, the multiplicative layers'
kernels and the convolutions; per unit row for the sparse FFN's [B, N, d] stores; per row for embeddings,
gates and the multiplicative output layer's unit-major kernel. Biases and norms are not listed: they stay
float. `model.weights = "int8"` builds the model this way (a checkpoint of int8 weights: `compress
--method=int8`); `quantize_params` converts float weights at load (`--weights=int8`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

LEVELS = 127  # symmetric: -127..127 (-128 unused, so negation is exact)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Weight:
    """A weight stored as int8 `q` and float32 `scale` (q's shape with the reduced axes kept as 1):
    weight ~= q * scale. Indexing (`w[...]`) gives the dequantised float32 array."""

    q: jax.Array
    scale: jax.Array

    def __getitem__(self, key):
        return (self.q.astype(self.scale.dtype) * self.scale)[key]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    @property
    def size(self) -> int:
        return self.q.size

    @property
    def dtype(self):
        """The dtype the weight reads as (its scales'), as `w[...].dtype`."""
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        return self.q.size + self.scale.size * jnp.dtype(self.scale.dtype).itemsize

    def reshape(self, *shape: int) -> "Int8Weight":
        """The values reshaped; the scale, one per first or last dimension's entry, follows that dimension
        (a convolution kernel [kl, ks, M, M] with a scale per output channel as a [kl ks M, M] matrix)."""
        q = self.q.reshape(*shape)
        varying = [i for i, size in enumerate(self.scale.shape) if size != 1]  # the axes with their own scales
        if varying == list(range(varying[0] if varying else 0, self.scale.ndim)) and self.scale.size == q.shape[-1]:
            return Int8Weight(q, self.scale.reshape((1,) * (q.ndim - 1) + (self.scale.size,)))  # trailing axes
        if varying == list(range(len(varying))) and self.scale.size == q.shape[0]:  # leading axes
            return Int8Weight(q, self.scale.reshape((self.scale.size,) + (1,) * (q.ndim - 1)))
        raise ValueError(f"cannot reshape an int8 weight {self.q.shape} with scales {self.scale.shape} to {shape}")


def _value(weight):
    return weight.get_value() if isinstance(weight, nnx.Variable) else weight


def matmul(x: jax.Array, weight, *, transposed: bool = False) -> jax.Array:
    """x @ W (transposed: x @ W.T) for a float or int8 weight (a parameter or its value), in x's dtype.

    int8: the scale (one per output channel: W [K, N] with scale [1, N], or W.T's rows: [N, K] with [N, 1])
    multiplies the sums. Traced for a Decoder using the CPU kernels, with few rows, one kernel call reads
    the int8 bytes directly (kernels/cpu.py int8_matmul); elsewhere XLA widens the values first."""
    from scaling_sparse.kernels import cpu as cpu_kernels

    w = _value(weight)
    if not isinstance(w, Int8Weight):
        w = w.astype(x.dtype)
        return x @ (w.T if transposed else w)
    n = w.q.shape[0] if transposed else w.q.shape[-1]
    if w.q.ndim != 2 or w.scale.size != n or w.scale.shape[0 if transposed else 1] != n:
        raise ValueError(f"int8 matmul: weight {w.q.shape} with scales {w.scale.shape} has not one scale per output")
    scale = w.scale.reshape(n)
    rows = math.prod(x.shape[:-1])
    if cpu_kernels.active() and x.dtype == jnp.float32 and rows <= cpu_kernels.INT8_KERNEL_ROWS:
        return cpu_kernels.int8_matmul(x, w.q, scale, transposed=transposed)
    # Widened and scaled before the dot: `(x @ q.astype(f32)) * scale` let XLA's CPU backend (jaxlib 0.10.2)
    # fold the int8 -> f32 convert into the dot, which gave NaN rows inside the decode loop's program.
    dense = w[...].astype(x.dtype)
    return x @ (dense.T if transposed else dense)


def take_rows(weight, indices: jax.Array) -> jax.Array:
    """Rows of a [rows, d] table (an embedding) at `indices`; int8 rows are widened after the gather, so a
    lookup reads its rows, not the whole table."""
    w = _value(weight)
    if not isinstance(w, Int8Weight):
        return jnp.take(w, indices, axis=0)
    return jnp.take(w.q, indices, axis=0).astype(w.scale.dtype) * jnp.take(w.scale, indices, axis=0)


def quantize(w: jax.Array, axes: tuple[int, ...]) -> Int8Weight:
    """Symmetric int8 with one scale per slice over `axes` (the scale = max |w| / 127; an all-zero slice
    gets scale 1 and stays zero)."""
    w = jnp.asarray(w, jnp.float32)
    axes = tuple(a % w.ndim for a in axes)
    amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / LEVELS, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / scale), -LEVELS, LEVELS).astype(jnp.int8)
    return Int8Weight(q, scale)


def is_int8(variable) -> bool:
    """Whether a parameter (nnx.Variable) or value holds int8 weights."""
    value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
    return isinstance(value, Int8Weight)


def quantize_model(model: nnx.Module) -> nnx.Module:
    """Replaces, in place, the value of every parameter a layer lists in INT8_AXES by its Int8Weight.
    Works under nnx.eval_shape (abstract weights). Returns the model."""
    for _, node in nnx.iter_graph(model):
        for name, axes in getattr(type(node), "INT8_AXES", {}).items():
            variable = getattr(node, name, None)
            if isinstance(variable, nnx.Variable) and not is_int8(variable):
                variable.set_value(quantize(variable.get_value(), axes))
    return model


def quantize_params(graphdef, params):
    """(graphdef, float params) -> (graphdef, int8 params) of the same model (once, at load)."""
    model = quantize_model(nnx.merge(graphdef, params))
    return nnx.split(model, nnx.Param)


def has_int8(params) -> bool:
    return any(isinstance(x, Int8Weight) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight)))


def scale_axes(axes: tuple, weight: Int8Weight) -> Int8Weight:
    """The logical axis names of an Int8Weight's leaves: q keeps the weight's; a reduced (size-1) scale
    axis is never sharded."""
    return Int8Weight(tuple(axes), tuple(None if s == 1 and n != 1 else a
                                         for a, s, n in zip(axes, weight.scale.shape, weight.q.shape)))
