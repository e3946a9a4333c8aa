"""LSH (Reformer) causal self-attention, as the Terraformer uses it (docs/semantics.md §4).

Full pass (train and eval):
  - shared QK: the keys are the queries, length-normalised (k = q / |q|); V as usual;
  - random-rotation hashing per head and hash round: bucket = argmax([xR, -xR]) over n_buckets;
  - tokens are sorted by (bucket, position) and cut into chunks of `chunk_len`; each chunk attends to
    itself and the previous chunk (the first chunk only to itself), causally by original position;
  - a token attends to itself only when nothing else is available (its own logit is -1e5, masked
    ones -1e9, as in Trax);
  - with several hash rounds, each round's output is weighted by the softmax over rounds of its
    log-sum-exp (duplicate keys seen in several rounds are not de-duplicated).
Rotations come from the layer's rng key in training (fresh each step) and from a fixed key in eval,
so eval is deterministic. Sequences are padded to a multiple of the chunk; padding sits after every
real position, so the causal mask hides it.

Decoding (documented choice): a new token attends to the WHOLE KV cache with the same shared-QK
scoring and self-mask (`attend_cache`), i.e. exactly what LSH attention computes when every token
falls in one chunk; LSH only approximates this full attention. Hashing cannot be decoded exactly
token by token anyway: which chunk a token lands in depends on the buckets of later tokens. Decode
equals eval whenever the sequence fits one chunk (tests/test_lsh.py checks both facts).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.dropout import dropout

MASK_VALUE = -1e9       # a key the query must not see (future, or outside the two chunks)
SELF_MASK_VALUE = -1e5  # the query itself: used only when nothing else is visible
EVAL_ROTATION_SEED = 0


def length_normalized(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / (norm + eps).astype(x.dtype)).astype(x.dtype)


def default_n_buckets(length: int, chunk_len: int) -> int:
    """The reference's default, 2 * length / chunk_len, rounded up to an even number >= 2."""
    return max(2, 2 * math.ceil(length / chunk_len))


def hash_buckets(x: jax.Array, n_buckets: int, n_hashes: int, key) -> jax.Array:
    """x [b, h, L, dh] -> buckets [b, h, n_hashes, L] by random rotations (one set per head)."""
    b, h, length, dh = x.shape
    if n_buckets == 1:
        return jnp.zeros((b, h, n_hashes, length), jnp.int32)
    rotations = jax.random.normal(key, (h, dh, n_hashes, n_buckets // 2), jnp.float32)
    rotated = jnp.einsum("bhld,hdnr->bhnlr", x.astype(jnp.float32), rotations)
    return jnp.argmax(jnp.concatenate([rotated, -rotated], axis=-1), axis=-1).astype(jnp.int32)


def _masked_scores(q, k, q_pos, k_pos, visible):
    """Scaled q.k in float32 with the causal mask, the self-mask and `visible` applied."""
    scores = jnp.einsum("...qd,...kd->...qk", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    allowed = (k_pos[..., None, :] <= q_pos[..., :, None]) & visible
    scores = jnp.where(allowed, scores, MASK_VALUE)
    is_self = (k_pos[..., None, :] == q_pos[..., :, None]) & visible
    return jnp.where(is_self, SELF_MASK_VALUE, scores)


def lsh_attention(q: jax.Array, v: jax.Array, *, chunk_len: int, n_buckets: int = 0, n_hashes: int = 1,
                  key=None, dropout_rate: float = 0.0, dropout_rng=None, train: bool = False) -> jax.Array:
    """Causal shared-QK LSH attention. q, v [b, L, h, dh] -> [b, L, h, dh]."""
    b, length, h, dh = q.shape
    chunk = min(chunk_len, length)
    padded = -(-length // chunk) * chunk
    n_chunks = padded // chunk
    n_buckets = n_buckets or default_n_buckets(padded, chunk_len)
    if key is None:
        key = jax.random.PRNGKey(EVAL_ROTATION_SEED)
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    qh = jnp.pad(q, pad).transpose(0, 2, 1, 3)  # [b, h, Lp, dh]
    vh = jnp.pad(v, pad).transpose(0, 2, 1, 3)

    buckets = hash_buckets(qh, n_buckets, n_hashes, key)               # [b, h, n, Lp]
    positions = jnp.arange(padded, dtype=jnp.int32)
    perm = jnp.argsort(buckets * padded + positions, axis=-1)          # sort by (bucket, position)
    gather = lambda a: jnp.take_along_axis(a[:, :, None], perm[..., None], axis=3)  # noqa: E731
    sq, sv = gather(qh), gather(vh)                                    # [b, h, n, Lp, dh]
    sk = length_normalized(sq)

    def chunked(a):
        return a.reshape(a.shape[:3] + (n_chunks, chunk) + a.shape[4:])

    def with_previous(a):  # own chunk then the previous one, along the key axis (axis 4)
        return jnp.concatenate([a, jnp.roll(a, 1, axis=3)], axis=4)

    cq, ck, cv, cpos = chunked(sq), chunked(sk), chunked(sv), chunked(perm)
    k_pos = with_previous(cpos)                                        # [b, h, n, C, 2c]
    has_previous = jnp.arange(n_chunks) > 0                            # chunk 0 does not wrap around
    visible = jnp.concatenate([jnp.ones((n_chunks, chunk), bool),
                               jnp.broadcast_to(has_previous[:, None], (n_chunks, chunk))], axis=1)
    scores = _masked_scores(cq, with_previous(ck), cpos, k_pos, visible[:, None, :])
    # softmax subtracts the max first: exp(scores - lse) would lose precision next to -1e5.
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = dropout(probs, dropout_rate, dropout_rng, train=train)
    out = jnp.einsum("...qk,...kd->...qd", probs, with_previous(cv))  # [b, h, n, C, c, dh]

    # Undo the sort, then mix the hash rounds by their softmax weights.
    inverse = jnp.argsort(perm, axis=-1)
    out = jnp.take_along_axis(out.reshape(b, h, n_hashes, padded, dh), inverse[..., None], axis=3)
    lse = jnp.take_along_axis(lse.reshape(b, h, n_hashes, padded), inverse, axis=3)
    weights = jax.nn.softmax(lse, axis=2)[..., None].astype(out.dtype)
    out = jnp.sum(out * weights, axis=2)                               # [b, h, Lp, dh]
    return out.transpose(0, 2, 1, 3)[:, :length]


def attend_cache(q: jax.Array, k_all: jax.Array, v_all: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Decoding: q [b, T, h, dh] at positions q_pos [T] over the whole cache (normalised keys
    k_all, values v_all [b, S, h, dh]) with LSH's causal and self masks -> [b, T, h, dh]."""
    k_pos = jnp.arange(k_all.shape[1], dtype=jnp.int32)
    qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k_all, v_all))
    scores = _masked_scores(qh, kh, q_pos.astype(jnp.int32), k_pos, jnp.ones((), bool))
    probs = jax.nn.softmax(scores, axis=-1).astype(v_all.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, vh).transpose(0, 2, 1, 3)


class LSHAttention(nnx.Module):
    """The attention core CausalSelfAttention uses when model.attention == "lsh" (no parameters)."""

    def __init__(self, *, chunk_len: int, n_buckets: int = 0, n_hashes: int = 1):
        if chunk_len < 1:
            raise ValueError(f"model.lsh_chunk_len must be >= 1, got {chunk_len}: use e.g. 128")
        if n_hashes < 1:
            raise ValueError(f"model.lsh_n_hashes must be >= 1, got {n_hashes}: use 1 (Terraformer) to 8")
        if n_buckets < 0 or (n_buckets > 1 and n_buckets % 2):
            raise ValueError(f"model.lsh_n_buckets must be 0 (= 2 * seq_len / chunk_len), 1 or even, got "
                             f"{n_buckets}: random rotations hash into an even number of buckets")
        self.chunk_len = chunk_len
        self.n_buckets = n_buckets
        self.n_hashes = n_hashes

    def __call__(self, q, v, *, train: bool, rng=None, dropout_rate: float = 0.0):
        rotation_key, dropout_key = jax.random.split(rng) if train else (None, None)
        return lsh_attention(q, v, chunk_len=self.chunk_len, n_buckets=self.n_buckets, n_hashes=self.n_hashes,
                             key=rotation_key, dropout_rate=dropout_rate, dropout_rng=dropout_key, train=train)

    def key(self, q):
        """The cached key of a token: its normalised query (shared QK)."""
        return length_normalized(q)

    def attend_cache(self, q, k_all, v_all, q_pos):
        return attend_cache(q, k_all, v_all, q_pos)
