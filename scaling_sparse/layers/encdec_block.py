"""Pre-LayerNorm blocks of the encoder-decoder (docs/semantics.md §5), built from the same layer
factory as the decoder-only model, so every sparsity flag reaches them:
  EncoderBlock:      x + drop(attn(LN x, mask)), then x + drop(ffn(LN x)); dense bidirectional
                     attention, the factory's FFN (sparse FFN when model.ff_sparsity is set).
  CrossDecoderBlock: x + drop(self_attn(LN x)) (the factory's causal attention: sparse QKV when
                     model.attn_sparsity is set), x + drop(cross(LN x, encoder memory)) (dense),
                     x + drop(ffn(LN x)).
  ReversibleEncoderBlock: the Terraformer's encoder block (models/terraformer_encdec.py): two reversible
                     half-residuals, dense bidirectional attention then the factory's FFN.
"""

from __future__ import annotations

import jax
from flax import nnx

from scaling_sparse.layers.base import check_mode
from scaling_sparse.layers.block import ffn_norm_for, pre_norm
from scaling_sparse.layers.cross_attention import CrossAttention, EncoderSelfAttention
from scaling_sparse.layers.dropout import dropout
from scaling_sparse.layers.factory import make_attention, make_ffn, param_dtype
from scaling_sparse.layers.norm import LayerNorm
from scaling_sparse.layers.reversible import ReversibleBlock


def _keys(rng, n, train):
    return jax.random.split(rng, n) if train else [None] * n


class EncoderBlock(nnx.Module):
    def __init__(self, m, *, rngs: nnx.Rngs):
        self.attn_norm = LayerNorm(m.d_model, eps=m.layer_norm_eps)
        self.attn = EncoderSelfAttention(m.d_model, m.n_heads, rngs=rngs, attn_dropout=m.attn_dropout,
                                         param_dtype=param_dtype(m))
        self.ffn = make_ffn(m, rngs)
        self.ffn_norm = ffn_norm_for(self.ffn, m)
        self.dropout_rate = m.dropout

    def __call__(self, x, mask, *, mode: str = "eval", rng=None):
        train = check_mode(mode)
        keys = _keys(rng, 4, train)
        x = x + dropout(self.attn(self.attn_norm(x), mask, mode=mode, rng=keys[0]), self.dropout_rate, keys[1],
                        train=train)
        h = self.ffn(pre_norm(self.ffn_norm, x), mode=mode, rng=keys[2])
        return x + dropout(h, self.dropout_rate, keys[3], train=train)


class CrossDecoderBlock(nnx.Module):
    def __init__(self, m, *, rngs: nnx.Rngs):
        self.attn_norm = LayerNorm(m.d_model, eps=m.layer_norm_eps)
        self.attn = make_attention(m, rngs)
        self.cross_norm = LayerNorm(m.d_model, eps=m.layer_norm_eps)
        self.cross = CrossAttention(m.d_model, m.n_heads, rngs=rngs, attn_dropout=m.attn_dropout,
                                    param_dtype=param_dtype(m))
        self.ffn = make_ffn(m, rngs)
        self.ffn_norm = ffn_norm_for(self.ffn, m)
        self.dropout_rate = m.dropout

    def __call__(self, x, memory, *, mode: str = "eval", rng=None):
        train = check_mode(mode)
        keys = _keys(rng, 6, train)
        x = x + dropout(self.attn(self.attn_norm(x), mode=mode, rng=keys[0]), self.dropout_rate, keys[1],
                        train=train)
        x = x + dropout(self.cross(self.cross_norm(x), memory, mode=mode, rng=keys[2]), self.dropout_rate,
                        keys[3], train=train)
        h = self.ffn(pre_norm(self.ffn_norm, x), mode=mode, rng=keys[4])
        return x + dropout(h, self.dropout_rate, keys[5], train=train)

    def init_cache(self, memory, cache_len: int, dtype):
        """Self-attention and FFN caches for `cache_len` decoder positions, and the cross memory."""
        batch = memory["k"].shape[0]
        return {"attn": self.attn.init_cache(batch, cache_len, dtype), "cross": memory,
                "ffn": self.ffn.init_cache(batch, cache_len, dtype)}

    def decode(self, x, cache, index):
        h, attn_cache = self.attn.decode(self.attn_norm(x), cache["attn"], index)
        x = x + h
        h, cross_cache = self.cross.decode(self.cross_norm(x), cache["cross"], index)
        x = x + h
        h, ffn_cache = self.ffn.decode(pre_norm(self.ffn_norm, x), cache["ffn"], index)
        return x + h, {"attn": attn_cache, "cross": cross_cache, "ffn": ffn_cache}


class ReversibleEncoderBlock(ReversibleBlock):
    """Half-residuals (a, b) -> (b + F(LN a), a) for F = dense bidirectional attention, then the FFN
    (trax terraformer.py's encoder block; docs/semantics.md §4). The stack's `context` is the padding
    mask. The encoder runs once per input: no decode path."""

    SUBLAYERS = ("attn", "ffn")

    def __init__(self, m, *, rngs: nnx.Rngs):  # noqa: super().__init__ would build the decoder's sub-layers
        self.attn_norm = LayerNorm(m.d_model, eps=m.layer_norm_eps)
        self.attn = EncoderSelfAttention(m.d_model, m.n_heads, rngs=rngs, attn_dropout=m.attn_dropout,
                                         param_dtype=param_dtype(m))
        self.ffn = make_ffn(m, rngs)
        self.ffn_norm = ffn_norm_for(self.ffn, m)

    def _call_attention(self, layer, x, *, mode, rng, context, **kwargs):
        return layer(x, context, mode=mode, rng=rng)
