"""Causal multi-head self-attention with a KV cache; the Q/K/V maker and output are pluggable."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.kernels import cpu as cpu_kernels
from scaling_sparse.layers.base import check_mode
from scaling_sparse.layers.dropout import dropout


def dot_product_attention(q, k, v, mask, *, dropout_rate=0.0, rng=None, train=False):
    """q [b, tq, h, dh], k/v [b, tk, h, dh], mask broadcastable to [b, h, tq, tk] (True = attend)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = dropout(probs, dropout_rate, rng, train=train)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def merge_heads_into_batch(x):
    """[b, T, h, dh] -> [b*h, T, dh]: the decode caches' leading axis (see init_cache)."""
    b, t, h, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * h, t, dh)


def split_heads_from_batch(x, batch: int):
    """[b*h, T, dh] -> [b, T, h, dh]."""
    n, t, dh = x.shape
    return x.reshape(batch, n // batch, t, dh).transpose(0, 2, 1, 3)


def update_cache(k_t, v, k, vals, index):
    """Writes T new keys and values ([b, T, h, dh]) at `index` into the caches (keys transposed
    k_t [b*h, dh, S], values v [b*h, S, dh]) -> (k_t, v)."""
    k_t = jax.lax.dynamic_update_slice(k_t, merge_heads_into_batch(k).transpose(0, 2, 1).astype(k_t.dtype),
                                       (0, 0, index))
    v = jax.lax.dynamic_update_slice(v, merge_heads_into_batch(vals).astype(v.dtype), (0, index, 0))
    return k_t, v


def attention_kernel_applies(q, k, vals, k_t, v) -> bool:
    """One query position, float32, traced by a Decoder using the CPU kernels (docs/kernels.md)."""
    return (cpu_kernels.active() and q.shape[1] == 1
            and all(a.dtype == jnp.float32 for a in (q, k, vals, k_t, v)))


def attention_kernel(q, k, vals, k_t, v, q_pos, *, scale: float, self_value: float | None = None):
    """update_cache then cached_attention (or LSH's attend_cache, with its `self_value`) for one query
    position as one CPU kernel: q, k, vals [b, 1, h, dh] -> (o [b, 1, h, dh], k_t, v)."""
    o, k_t, v = cpu_kernels.cached_attention_decode(
        merge_heads_into_batch(q)[:, 0], merge_heads_into_batch(k)[:, 0], merge_heads_into_batch(vals)[:, 0],
        k_t, v, q_pos[0], scale=scale, self_value=self_value)
    return split_heads_from_batch(o[:, None], q.shape[0]), k_t, v


def cached_attention(q, k_t, v, q_pos, *, scale: float):
    """Decoding: q [b, T, h, dh] at positions q_pos [T] over the cache (keys transposed
    k_t [b*h, dh, S], values v [b*h, S, dh], this step's tokens written in) -> [b, T, h, dh]; the same
    sums as dot_product_attention with the causal mask."""
    logits = jnp.einsum("nqd,ndk->nqk", merge_heads_into_batch(q), k_t).astype(jnp.float32) * scale
    k_pos = jnp.arange(k_t.shape[-1])
    logits = jnp.where(k_pos[None, :] <= q_pos[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return split_heads_from_batch(jnp.einsum("nqk,nkd->nqd", probs, v), q.shape[0])


class CausalSelfAttention(nnx.Module):
    component = "attention"

    def __init__(self, *, d_model: int, n_heads: int, qkv: nnx.Module, out: nnx.Module | None,
                 attn_dropout: float = 0.0, lsh: nnx.Module | None = None, d_head: int = 0):
        self.d_model = d_model
        self.d_head = d_head or d_model // n_heads  # a CoFi-pruned model's heads keep their width
        self.lsh = lsh  # layers/lsh.py: shared-QK LSH attention replaces the dot product
        self.qkv = qkv
        self.out = out
        self.n_heads = n_heads
        self.attn_dropout = attn_dropout

    def _heads(self, x):
        b, t, _ = x.shape
        return x.reshape(b, t, self.n_heads, self.d_head)

    def _project_out(self, o):
        b, t = o.shape[:2]
        o = o.reshape(b, t, -1)
        return o if self.out is None else self.out(o)

    @staticmethod
    def _shared_qk(q, k):
        """LSH's one vector per token: Q with dense QKV (no K is built), (Q + K) / 2 with sparse QKV,
        whose Q and K come from different convolutions of the same multiplicative output (trax
        efficient_attention.py; docs/semantics.md §4)."""
        return q if k is None else (q + k) / 2

    def lsh_buckets(self, x, *, mode: str = "eval", rng=None):
        """The LSH buckets a call with the same (x, mode, rng) uses; None without LSH. The reversible
        stack stores them in the forward pass and passes them back (`buckets`) when it recomputes."""
        if self.lsh is None:
            return None
        q, k, _ = self.qkv(x)
        qk = self._heads(self._shared_qk(q, k))
        return self.lsh.hash(qk, train=check_mode(mode), rng=rng)

    def __call__(self, x, *, mode: str = "eval", rng=None, buckets=None):
        train = check_mode(mode)
        q, k, v = self.qkv(x)
        if self.lsh is not None:
            qk, v = self._heads(self._shared_qk(q, k)), self._heads(v)
            return self._project_out(self.lsh(qk, v, train=train, rng=rng, dropout_rate=self.attn_dropout,
                                              buckets=buckets))
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        t = x.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))
        o = dot_product_attention(q, k, v, mask, dropout_rate=self.attn_dropout, rng=rng, train=train)
        return self._project_out(o)

    def init_cache(self, batch: int, cache_len: int, dtype):
        """Caches in the layouts the two attention dots read, batch and heads merged into one leading
        axis (docs/benchmarks.md, "Decode at the memory floor"): keys transposed [b*h, dh, L], values
        [b*h, L, dh]. With token-major [b, L, h, dh] caches XLA's CPU backend copied both whole caches
        into the dots' layouts at every decoded token, and with [b, h, ...] caches it duplicated the
        cache update to drop the batch axis; either took as long as a sparse layer's weight reads."""
        n, dh = batch * self.n_heads, self.d_head
        return {"k": jnp.zeros((n, dh, cache_len), dtype), "v": jnp.zeros((n, cache_len, dh), dtype),
                "qkv": self.qkv.init_cache(batch, cache_len, dtype)}

    def decode(self, x, cache, index):
        (q, k, v), qkv_cache = self.qkv.decode(x, cache["qkv"], index)
        if self.lsh is not None:  # the shared qk is the query; its normalised form is the cached key
            q = self._heads(self._shared_qk(q, k))
            k = self.lsh.key(q)
        else:
            q, k = self._heads(q), self._heads(k)
        v = self._heads(v)
        q_pos = index + jnp.arange(x.shape[1])
        if attention_kernel_applies(q, k, v, cache["k"], cache["v"]):  # the cache update and attention, one call
            scoring = self.lsh.cache_scoring() if self.lsh is not None else {"scale": self.d_head ** -0.5}
            o, k_t, v_all = attention_kernel(q, k, v, cache["k"], cache["v"], q_pos, **scoring)
        else:
            k_t, v_all = update_cache(cache["k"], cache["v"], k, v, index)
            if self.lsh is not None:  # full attention over the cache with LSH's scoring (see lsh.py)
                o = self.lsh.attend_cache(q, k_t, v_all, q_pos)
            else:
                o = cached_attention(q, k_t, v_all, q_pos, scale=self.d_head ** -0.5)
        return self._project_out(o), {"k": k_t, "v": v_all, "qkv": qkv_cache}

    def params_per_token(self) -> int:
        return self.qkv.params_per_token() + (0 if self.out is None else self.out.params_per_token())
