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
