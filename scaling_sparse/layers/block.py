"""Pre-LayerNorm decoder block: x + attn(LN x), then x + ffn(LN x)."""

from __future__ import annotations

import jax
from flax import nnx

from scaling_sparse.layers.base import check_mode
from scaling_sparse.layers.dropout import dropout
from scaling_sparse.layers.factory import make_attention, make_ffn
from scaling_sparse.layers.norm import LayerNorm


def pre_norm(norm, x):
    """LN(x), or x itself for a sub-layer that normalises its own input (norm None, `takes_raw_stream`)."""
    return x if norm is None else norm(x)


def ffn_features(norm, ffn, x):
    """The LayerNorm output an FFN reads (TRIME's key and query, trime_loss.py): LN(x), or, for an FFN that
    normalises the raw stream itself (SRU), its main FFN's LayerNorm of x."""
    if norm is not None:
        return norm(x)
    main_norm = getattr(ffn, "main_norm", None)
    if main_norm is None:
        raise ValueError("this layer has no LayerNorm before its FFN: TRIME's features are undefined for it")
    return main_norm(x)


def ffn_norm_for(ffn, m):
    """The block's LayerNorm before the FFN: none when the FFN takes the raw stream (SRU, layers/sru.py)."""
    return None if getattr(ffn, "takes_raw_stream", False) else LayerNorm(m.d_model, eps=m.layer_norm_eps)


class DecoderBlock(nnx.Module):
    """`layer`: the block's index, for models whose layers differ (a CoFi-pruned model, docs/compression.md:
    its own head count and FFN width; 0 heads or 0 units = that sub-layer is gone, its residual branch
    adds nothing and no weights are built)."""

    def __init__(self, m, *, rngs: nnx.Rngs, layer: int = 0):
        heads, d_ff = m.heads_of(layer), m.d_ff_of(layer)
        self.attn_norm = LayerNorm(m.d_model, eps=m.layer_norm_eps) if heads else None
        self.attn = make_attention(m, rngs, heads) if heads else None
        self.ffn = make_ffn(m, rngs, d_ff) if d_ff else None
        self.ffn_norm = ffn_norm_for(self.ffn, m) if d_ff else None
        self.dropout_rate = m.dropout

    def __call__(self, x, *, mode: str = "eval", rng=None, features: bool = False):
        """-> x, or (x, the FFN's LayerNorm output) with features=True (TRIME, trime_loss.py)."""
        train = check_mode(mode)
        keys = jax.random.split(rng, 4) if train else [None] * 4
        if self.attn is not None:
            h = self.attn(self.attn_norm(x), mode=mode, rng=keys[0])
            x = x + dropout(h, self.dropout_rate, keys[1], train=train)
        if self.ffn is None:
            if features:
                raise ValueError("TRIME needs the last block's FFN input, but this (pruned) block has no FFN")
            return x
        ffn_in = pre_norm(self.ffn_norm, x)
        g = ffn_features(self.ffn_norm, self.ffn, x) if features and self.ffn_norm is None else ffn_in
        h = self.ffn(ffn_in, mode=mode, rng=keys[2])
        x = x + dropout(h, self.dropout_rate, keys[3], train=train)
        return (x, g) if features else x

    def init_cache(self, batch: int, cache_len: int, dtype):
        return {"attn": {} if self.attn is None else self.attn.init_cache(batch, cache_len, dtype),
                "ffn": {} if self.ffn is None else self.ffn.init_cache(batch, cache_len, dtype)}

    def decode(self, x, cache, index):
        attn_cache, ffn_cache = cache["attn"], cache["ffn"]
        if self.attn is not None:
            h, attn_cache = self.attn.decode(self.attn_norm(x), attn_cache, index)
            x = x + h
        if self.ffn is not None:
            h, ffn_cache = self.ffn.decode(pre_norm(self.ffn_norm, x), ffn_cache, index)
            x = x + h
        return x, {"attn": attn_cache, "ffn": ffn_cache}
