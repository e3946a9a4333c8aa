"""The protocol every residual sub-layer (attention, FFN) follows.

Three modes, one set of weights:
  - `layer(x, mode="train", rng=key)`: full causal sequence, stochastic (dropout, Gumbel masks).
  - `layer(x, mode="eval")`: full causal sequence, deterministic, dense compute.
  - `layer.decode(x, cache, index)`: `x` holds T new positions starting at absolute position
    `index` (T = prompt length for prefill, 1 for a decode step); returns (y, new_cache). It reads
    only the weights it uses and must equal eval mode to float tolerance.
`layer.init_cache(batch, cache_len, dtype)` returns the (possibly empty) decode-state pytree.
`layer.params_per_token()` is the number of parameters read to decode one token.

Layers compute in the dtype of their input and cast weights to it; decoding casts the weights
once beforehand (decode.cast_params), so nothing is converted per token.
"""

from __future__ import annotations

import jax

TRAIN = "train"
EVAL = "eval"
MODES = (TRAIN, EVAL)


def check_mode(mode: str) -> bool:
    """Returns True for training mode; raises on an unknown mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode == TRAIN


def param_count(module) -> int:
    """Number of trainable parameters held by an NNX module."""
    from flax import nnx

    state = nnx.state(module, nnx.Param)
    return int(sum(x.size for x in jax.tree.leaves(state)))
