"""TrimeLM_long's evaluation memory across batches (`eval --memory=long --memory_fifo=N`; docs/trime.md):
a FIFO of the (key g, next token) of the last N scored tokens, carried from one evaluation batch to the
next, joins each query's in-batch memory in the joint softmax (trime_loss.py).

Evaluation batches are consecutive windows of the validation stream, so the FIFO holds exactly the text
before the batch. It holds only earlier batches' tokens: the reference's FIFO also held the window's own
context, which then counted twice. The FIFO update runs inside the jitted step (static shapes: the old N
entries and the batch's B*T, the last N kept; padding entries stay invisible).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling_sparse import sharding
from scaling_sparse.trime_loss import trime_token_losses


def fifo_token_losses(logits, features, targets, weights, kind: str, temperature: float, keys, labels, valid):
    """Per-token losses [B, T] with the in-batch memory (local: the window's earlier tokens; long: every
    earlier token of the batch) and the FIFO entries (keys [N, d], labels [N], valid [N]), all visible."""
    return trime_token_losses(logits, features, targets, weights, kind, temperature=temperature,
                              group_rows=targets.shape[0], extra=(keys, labels, valid))


@functools.lru_cache(maxsize=8)
def make_fifo_eval_step(graphdef, mesh, rules: tuple, kind: str, temperature: float):
    """-> jitted (params, batch, fifo) -> ((loss_sum, weight_sum, correct_sum), new fifo); fifo = (keys [N, d],
    labels [N], valid [N])."""

    def step(params, batch, fifo):
        with sharding.activation_rules(mesh, rules):
            logits, g = nnx.merge(graphdef, params).logits(batch, mode="eval", features=True)
        targets, weights = batch["targets"], batch["weights"]
        keys, labels, valid = fifo
        losses = fifo_token_losses(logits, g, targets, weights, kind, temperature, keys, labels, valid)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        n = keys.shape[0]
        new = (jnp.concatenate([keys, g.reshape(-1, g.shape[-1]).astype(keys.dtype)])[-n:],
               jnp.concatenate([labels, targets.reshape(-1)])[-n:],
               jnp.concatenate([valid, weights.reshape(-1) > 0])[-n:])
        return (jnp.sum(losses * weights), jnp.sum(weights), jnp.sum(correct * weights)), new

    replicated = sharding.replicated(mesh)
    return jax.jit(step, out_shardings=(replicated, replicated))


def evaluate_with_fifo(graphdef, params, batches, mesh, rules, *, kind: str, temperature: float, size: int,
                       d_model: int) -> dict:
    """train.evaluate_batches' metrics with a FIFO of `size` tokens carried across `batches` (global,
    train.global_batch), in order."""
    step = make_fifo_eval_step(graphdef, mesh, rules, kind, float(temperature))
    replicated = sharding.replicated(mesh)
    fifo = jax.device_put((jnp.zeros((size, d_model), jnp.float32), jnp.zeros((size,), jnp.int32),
                           jnp.zeros((size,), bool)), replicated)
    sums = []
    for batch in batches:
        out, fifo = step(params, batch, fifo)
        sums.append(jax.device_get(out))
    loss_sum, weight_sum, correct = np.asarray(sums, np.float64).sum(axis=0)
    loss = float(loss_sum / max(weight_sum, 1.0))
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))),
            "eval_accuracy": float(correct / max(weight_sum, 1.0)), "eval_tokens": int(weight_sum)}
