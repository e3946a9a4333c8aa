"""LSH (Reformer) causal self-attention, as the Terraformer uses it (docs/semantics.md §4).

Full pass (train and eval):
  - shared QK: one qk per token serves as the query (unscaled) and, RMS-normalised then divided by
    sqrt(d_k), as the key (a unit-length key): logits = qk . k_hat, with no further 1/sqrt(d_k)
    (trax efficient_attention.py, `length_normalized` and `_attend`); V as usual;
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

from scaling_sparse.layers.attention import merge_heads_into_batch, split_heads_from_batch
from scaling_sparse.layers.dropout import dropout

MASK_VALUE = -1e9       # a key the query must not see (future, or outside the two chunks)
SELF_MASK_VALUE = -1e5  # the query itself: used only when nothing else is visible
EVAL_ROTATION_SEED = 0


def length_normalized(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """The shared key: x / sqrt(mean(x^2) + eps) / sqrt(d_k), i.e. unit length up to eps (the reference
    RMS-normalises the key, then scales it by 1/sqrt(d_k) instead of scaling the logits)."""
    x32 = x.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (x32 / rms * x.shape[-1] ** -0.5).astype(x.dtype)


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
    """q.k in float32 (k already unit-length: no 1/sqrt(d_k) here) with the causal mask, the self-mask
    and `visible` applied."""
    return _mask_scores(jnp.einsum("...qd,...kd->...qk", q, k).astype(jnp.float32), q_pos, k_pos, visible)


def _mask_scores(scores, q_pos, k_pos, visible):
    """The causal mask, the self-mask and `visible` on scores [..., q, k]."""
    allowed = (k_pos[..., None, :] <= q_pos[..., :, None]) & visible
    scores = jnp.where(allowed, scores, MASK_VALUE)
    is_self = (k_pos[..., None, :] == q_pos[..., :, None]) & visible
    return jnp.where(is_self, SELF_MASK_VALUE, scores)


def _padded_heads(x: jax.Array, chunk_len: int):
    """x [b, L, h, dh] -> ([b, h, Lp, dh] zero-padded to a multiple of the chunk, chunk, Lp)."""
    length = x.shape[1]
    chunk = min(chunk_len, length)
    padded = -(-length // chunk) * chunk
    return jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3), chunk, padded


def lsh_buckets(q: jax.Array, *, chunk_len: int, n_buckets: int = 0, n_hashes: int = 1, key=None) -> jax.Array:
    """The bucket of every (padded) position: q [b, L, h, dh] -> int32 [b, h, n_hashes, Lp]. The
    reversible stack stores these and passes them back to `lsh_attention` when it recomputes the layer."""
    qh, chunk, padded = _padded_heads(q, chunk_len)
    n_buckets = n_buckets or default_n_buckets(padded, chunk_len)
    if key is None:
        key = jax.random.PRNGKey(EVAL_ROTATION_SEED)
    return hash_buckets(qh, n_buckets, n_hashes, key)


def lsh_attention(q: jax.Array, v: jax.Array, *, chunk_len: int, n_buckets: int = 0, n_hashes: int = 1,
                  key=None, dropout_rate: float = 0.0, dropout_rng=None, train: bool = False,
                  buckets=None) -> jax.Array:
    """Causal shared-QK LSH attention. q (the shared qk), v [b, L, h, dh] -> [b, L, h, dh]. `buckets`
    (lsh_buckets' output) replaces the hashing, e.g. the forward pass's in a recomputation."""
    b, length, h, dh = q.shape
    qh, chunk, padded = _padded_heads(q, chunk_len)
    vh = _padded_heads(v, chunk_len)[0]
    n_chunks = padded // chunk
    if buckets is None:
        buckets = lsh_buckets(q, chunk_len=chunk_len, n_buckets=n_buckets, n_hashes=n_hashes, key=key)
    n_hashes = buckets.shape[2]
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


def attend_cache(q: jax.Array, k_t: jax.Array, v: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Decoding: q [b, T, h, dh] at positions q_pos [T] over the whole cache (normalised keys
    transposed k_t [b*h, dh, S], values v [b*h, S, dh]: attention.py's layouts) with LSH's causal and
    self masks -> [b, T, h, dh]."""
    k_pos = jnp.arange(k_t.shape[-1], dtype=jnp.int32)
    scores = jnp.einsum("nqd,ndk->nqk", merge_heads_into_batch(q), k_t).astype(jnp.float32)
    scores = _mask_scores(scores, q_pos.astype(jnp.int32), k_pos, jnp.ones((), bool))
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return split_heads_from_batch(jnp.einsum("nqk,nkd->nqd", probs, v), q.shape[0])


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

    def __call__(self, qk, v, *, train: bool, rng=None, dropout_rate: float = 0.0, buckets=None):
        """`buckets`: this call's hashing computed earlier (`hash`), e.g. stored by the reversible stack."""
        rotation_key, dropout_key = jax.random.split(rng) if train else (None, None)
        return lsh_attention(qk, v, chunk_len=self.chunk_len, n_buckets=self.n_buckets, n_hashes=self.n_hashes,
                             key=rotation_key, dropout_rate=dropout_rate, dropout_rng=dropout_key, train=train,
                             buckets=buckets)

    def hash(self, qk, *, train: bool, rng=None):
        """The buckets __call__ would use with the same (train, rng): int32 [b, h, n_hashes, Lp]."""
        rotation_key = jax.random.split(rng)[0] if train else None
        return lsh_buckets(qk, chunk_len=self.chunk_len, n_buckets=self.n_buckets, n_hashes=self.n_hashes,
                           key=rotation_key)

    def key(self, qk):
        """The cached key of a token: its normalised shared qk."""
        return length_normalized(qk)

    def attend_cache(self, q, k_t, v, q_pos):
        return attend_cache(q, k_t, v, q_pos)

    def cache_scoring(self) -> dict:
        """attend_cache's scoring as the CPU attention kernel's arguments (layers/attention.py
        `attention_kernel`): keys already unit-length (no scale), the query's own score SELF_MASK_VALUE."""
        return {"scale": 1.0, "self_value": SELF_MASK_VALUE}
