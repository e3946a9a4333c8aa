"""TRIME's training objective (Zhong, Lei, Chen, "Training Language Models with Memory Augmentation",
EMNLP 2022, eq. 3; the authors' fairseq criterions trime_loss.py, trime_long_loss.py, trime_ext_loss.py):
earlier tokens of the batch are a memory that joins the vocabulary in one softmax (docs/trime.md).

For target y_i with logits f_i and visible memory M(i), each entry j a key g_j with label y_j (the token
that followed it, already seen):

    p(y_i) = [exp(f_i[y_i]) + sum_{j in M(i), y_j = y_i} exp(s_ij)] / [sum_v exp(f_i[v]) + sum_{j in M(i)} exp(s_ij)]
    s_ij = g_i . g_j / (sqrt(d) * temperature)

g: the last block's LayerNorm output before its FFN (the model's `features`), query and key alike.
The loss is -log p(y_i), weighted by the batch's weights like cross-entropy. A position with no visible
memory gets exactly cross-entropy. Masked entries get a large negative finite score, so gradients stay
finite when a row sees nothing.

Memory kinds (which j are visible to i):
  local  the same row, strictly earlier positions (TrimeLM)
  long   consecutive rows of one stream in groups of `group_rows`: every earlier row of the group, and
         the own row's earlier positions (TrimeLM_long)
  ext    every other row of the batch fully, the own row's earlier positions, or none of the own row
         when `hide_own` (a coin per step, TrimeLM_ext)
An entry is visible only if it is a real token (weight > 0): the reference also kept padded positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = -1e9  # the score of an invisible entry: exp underflows to 0, gradients stay finite


def joint_token_losses(logits, scores, visible, positive, targets):
    """-log p(y_i) per query. logits [..., V]; scores, visible, positive [..., M] (positive: visible
    entries whose label is the query's target); targets [...]. float32 [...]."""
    logits = logits.astype(jnp.float32)
    scores = scores.astype(jnp.float32)
    lse_vocab = jax.nn.logsumexp(logits, axis=-1)
    logit_y = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    lse_memory = jax.nn.logsumexp(jnp.where(visible, scores, MASKED), axis=-1)
    lse_positive = jax.nn.logsumexp(jnp.where(positive, scores, MASKED), axis=-1)
    return jnp.logaddexp(lse_vocab, lse_memory) - jnp.logaddexp(logit_y, lse_positive)


def local_visibility(weights):
    """[B, T, T]: entry (b, s) visible to query (b, t) when s < t and (b, s) is a real token."""
    t = weights.shape[1]
    earlier = jnp.arange(t)[None, :] < jnp.arange(t)[:, None]  # [query t, entry s]
    return earlier[None] & (weights[:, None, :] > 0)


def batch_visibility(weights, kind: str, *, group_rows: int = 1, hide_own=False):
    """[B, T, B*T]: entry (b', s) (flattened b' * T + s) visible to query (b, t), for kind long or ext."""
    b, t = weights.shape
    row_q, pos_q = jnp.arange(b)[:, None, None, None], jnp.arange(t)[None, :, None, None]
    row_k, pos_k = jnp.arange(b)[None, None, :, None], jnp.arange(t)[None, None, None, :]
    own_earlier = (row_k == row_q) & (pos_k < pos_q)
    if kind == "long":
        if b % group_rows:
            raise ValueError(f"batch of {b} rows is not a whole number of groups of {group_rows} rows")
        same_group = (row_k // group_rows) == (row_q // group_rows)
        visible = own_earlier | (same_group & (row_k < row_q))
    elif kind == "ext":
        visible = (row_k != row_q) | (own_earlier & ~jnp.asarray(hide_own))
    else:
        raise ValueError(f"memory kind {kind!r}: use local | long | ext")
    visible = visible & (weights[None, None, :, :] > 0)
    return visible.reshape(b, t, b * t)


def trime_token_losses(logits, features, targets, weights, kind: str = "local", *, temperature: float = 1.0,
                       group_rows: int = 1, hide_own=False, extra=None):
    """Per-token TRIME losses [B, T] (unweighted). logits [B, T, V]; features g [B, T, d]; targets and
    weights [B, T]. `local` costs B*T*T scores; `long` and `ext` (B*T)^2. extra=(keys [N, d], labels [N],
    valid [N]): further entries every query sees (evaluation's FIFO of earlier batches, memory_eval.py)."""
    g = features.astype(jnp.float32)
    scale = 1.0 / (jnp.sqrt(jnp.float32(g.shape[-1])) * temperature)
    if kind == "local":
        scores = jnp.einsum("btd,bsd->bts", g, g) * scale
        visible = local_visibility(weights)
        labels = targets[:, None, :]
    else:
        b, t, d = g.shape
        scores = jnp.einsum("btd,nd->btn", g, g.reshape(b * t, d)) * scale
        visible = batch_visibility(weights, kind, group_rows=group_rows, hide_own=hide_own)
        labels = targets.reshape(1, 1, b * t)
    labels = jnp.broadcast_to(labels, visible.shape)
    if extra is not None:
        keys, extra_labels, valid = extra
        extra_scores = jnp.einsum("btd,nd->btn", g, keys.astype(jnp.float32)) * scale
        scores = jnp.concatenate([scores, extra_scores], axis=-1)
        visible = jnp.concatenate([visible, jnp.broadcast_to(valid, extra_scores.shape)], axis=-1)
        labels = jnp.concatenate([labels, jnp.broadcast_to(extra_labels, extra_scores.shape)], axis=-1)
    positive = visible & (labels == targets[..., None])
    return joint_token_losses(logits, scores, visible, positive, targets)


def weighted_trime_loss(logits, features, targets, weights, kind: str = "local", **kwargs):
    """-> (sum of weighted token losses, sum of weights), as train.weighted_cross_entropy's first two."""
    losses = trime_token_losses(logits, features, targets, weights, kind, **kwargs)
    return jnp.sum(losses * weights), jnp.sum(weights)
