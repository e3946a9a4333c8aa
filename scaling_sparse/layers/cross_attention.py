"""The encoder-decoder's dense attentions (docs/semantics.md §5): the encoder's bidirectional
self-attention and the decoder's cross-attention. Both stay dense in the reference's sparse models
(trax configurable_transformer.py: sparse QKV only in the decoder's self-attention).

EncoderSelfAttention: three Dense(d, d) Q, K, V + a Dense(d, d) output; every real token attends to
every real token (`mask` [batch, L], True = a real token; padding is never attended to).

CrossAttention: Q from the decoder stream, K and V from the encoder output, a Dense(d, d) output.
`memory(encoded, mask)` projects K and V once per sequence; decoding keeps that memory as the
layer's cache, so a decoded token reads only the Q and output projections (2 d^2 weights, as the
reference's timing test counts them) plus the cached keys and values.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.attention import dot_product_attention
from scaling_sparse.layers.base import check_mode
from scaling_sparse.layers.dense import Dense
from scaling_sparse.layers.qkv import DenseQKV


def _heads(x, n_heads):
    return x.reshape(*x.shape[:2], n_heads, x.shape[-1] // n_heads)


def _merge_heads(o):
    return o.reshape(*o.shape[:2], -1)


class EncoderSelfAttention(nnx.Module):
    component = "attention"

    def __init__(self, d_model: int, n_heads: int, *, rngs: nnx.Rngs, attn_dropout: float = 0.0,
                 param_dtype=jnp.float32):
        self.qkv = DenseQKV(d_model, rngs=rngs, param_dtype=param_dtype)
        self.out = Dense(d_model, d_model, rngs=rngs, axes=("heads", "embed"), param_dtype=param_dtype)
        self.n_heads, self.attn_dropout = n_heads, attn_dropout

    def __call__(self, x, mask, *, mode: str = "eval", rng=None):
        """x [b, L, d], mask [b, L] (True = real token) -> [b, L, d]."""
        train = check_mode(mode)
        q, k, v = (_heads(a, self.n_heads) for a in self.qkv(x))
        o = dot_product_attention(q, k, v, mask[:, None, None, :], dropout_rate=self.attn_dropout, rng=rng,
                                  train=train)
        return self.out(_merge_heads(o))

    def params_per_token(self) -> int:
        """0: the encoder runs once per input, not per decoded token (params.py reports its total)."""
        return 0


class CrossAttention(nnx.Module):
    component = "attention"

    def __init__(self, d_model: int, n_heads: int, *, rngs: nnx.Rngs, attn_dropout: float = 0.0,
                 param_dtype=jnp.float32):
        dense = lambda axes: Dense(d_model, d_model, rngs=rngs, axes=axes, param_dtype=param_dtype)  # noqa: E731
        self.q, self.k, self.v = dense(("embed", "heads")), dense(("embed", "heads")), dense(("embed", "heads"))
        self.out = dense(("heads", "embed"))
        self.n_heads, self.attn_dropout = n_heads, attn_dropout

    def memory(self, encoded, mask, dtype=None):
        """The encoder side, once per input: {"k", "v": [b, Le, h, dh], "mask": [b, Le] bool}."""
        k, v = _heads(self.k(encoded), self.n_heads), _heads(self.v(encoded), self.n_heads)
        if dtype is not None:
            k, v = k.astype(dtype), v.astype(dtype)
        return {"k": k, "v": v, "mask": mask}

    def __call__(self, x, memory, *, mode: str = "eval", rng=None):
        """x [b, T, d] (decoder stream), memory (see `memory`) -> [b, T, d]."""
        train = check_mode(mode)
        q = _heads(self.q(x), self.n_heads)
        k, v = memory["k"].astype(q.dtype), memory["v"].astype(q.dtype)
        o = dot_product_attention(q, k, v, memory["mask"][:, None, None, :], dropout_rate=self.attn_dropout,
                                  rng=rng, train=train)
        return self.out(_merge_heads(o))

    def decode(self, x, cache, index):
        """The cache is the memory: nothing changes per token."""
        return self(x, cache), cache

    def params_per_token(self) -> int:
        return self.q.params_per_token() + self.out.params_per_token()
