"""Activation statistics for ASVD (docs/compression.md): the mean |x_i| of every input channel of
every attention and FFN linear layer, over calibration batches of the training data.

The statistics are taken from the model itself, run eagerly (not jitted) with each Dense layer's
call wrapped to record its input: at the stdlib size a few batches take seconds on a CPU, and no
second copy of the forward pass can drift from the model's."""

from __future__ import annotations

import contextlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling_sparse.layers.dense import Dense


@contextlib.contextmanager
def _recording_dense_inputs(sums: dict):
    """Within the block, every Dense call adds sum |x| over its tokens and the token count to
    sums[id(layer)]."""
    original = Dense.__call__

    def recording(self, x):
        flat = jnp.abs(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
        total, count = sums.get(id(self), (0.0, 0))
        sums[id(self)] = (total + np.asarray(flat.sum(0)), count + flat.shape[0])
        return original(self, x)

    Dense.__call__ = recording
    try:
        yield
    finally:
        Dense.__call__ = original


def input_abs_means(graphdef, params: dict, batches) -> dict:
    """{path of a Dense layer (tuple of keys): mean |x| over calibration tokens, [d_in]} for every
    Dense layer the model calls (attention, FFN and the output layer)."""
    model = nnx.merge(graphdef, params)
    sums: dict = {}
    with _recording_dense_inputs(sums):
        for batch in batches:
            model(jnp.asarray(batch["inputs"]), mode="eval")
    means = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense) and id(node) in sums:
            total, count = sums[id(node)]
            means[tuple(path)] = total / count
    return means
