"""The protocols every layer follows, and the one helper that creates a parameter.

Three modes, one set of weights (docs/architecture.md):
  - `layer(x, mode="train", rng=key)`: full causal sequence, stochastic (dropout, Gumbel masks).
  - `layer(x, mode="eval")`: full causal sequence, deterministic, dense compute.
  - `layer.decode(x, cache, index)`: `x` holds T new positions starting at absolute position
    `index` (T = prompt length for prefill, 1 for a decode step); returns (y, new_cache). It reads
    only the weights it uses and must equal eval mode to float tolerance.
`layer.init_cache(batch, cache_len, dtype)` returns the (possibly empty) decode-state pytree, and
`layer.params_per_token()` the number of parameters read to decode one token. Every residual
sub-layer, Q/K/V maker, FFN, recurrence and output layer has these same signatures.

Each layer class names the report component it belongs to (`component`), so the parameter report
asks the layers rather than guessing from attribute names.

Every parameter is created by `param(value, *logical_axes)`: it carries one logical axis name per
dimension (embed, mlp, heads, vocab, blocks, ...), which `scaling_sparse/sharding.py` maps to mesh
axes through `config.mesh.rules`, as flax's lm1b example and maxtext do.

Layers compute in the dtype of their input and cast weights to it; decoding casts the weights
once beforehand (decode.cast_params), so nothing is converted per token.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
from flax import nnx

TRAIN = "train"
EVAL = "eval"
MODES = (TRAIN, EVAL)

# What the parameter report groups layers into (params.py).
COMPONENTS = ("embedding", "attention", "ffn", "norms", "output")

# The metadata key holding a parameter's logical axis names.
AXES_KEY = "logical_axes"


@runtime_checkable
class DecodeLayer(Protocol):
    """Anything with a decode path: residual sub-layers, Q/K/V makers, recurrences, output layers."""

    component: str

    def init_cache(self, batch: int, cache_len: int, dtype) -> Any: ...

    def decode(self, x: jax.Array, cache: Any, index) -> tuple[Any, Any]: ...

    def params_per_token(self) -> int: ...


@runtime_checkable
class SubLayer(DecodeLayer, Protocol):
    """A residual sub-layer (attention or FFN): the full-sequence call in train or eval mode."""

    def __call__(self, x: jax.Array, *, mode: str = EVAL, rng=None) -> jax.Array: ...


def check_mode(mode: str) -> bool:
    """Returns True for training mode; raises on an unknown mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode == TRAIN


def param(value, *axes: str | None) -> nnx.Param:
    """A trainable parameter with one logical axis name per dimension (None = never sharded)."""
    if len(axes) != value.ndim:
        raise ValueError(f"a parameter of shape {value.shape} needs {value.ndim} logical axis names, got {axes}")
    return nnx.Param(value, **{AXES_KEY: tuple(axes)})


def param_count(module) -> int:
    """Number of trainable parameters held by an NNX module."""
    state = nnx.state(module, nnx.Param)
    return int(sum(x.size for x in jax.tree.leaves(state)))


def no_cache(batch: int, cache_len: int, dtype) -> dict:
    """init_cache of a layer that keeps no decode state."""
    return {}
