"""The one place that maps config fields to layer variants. Blocks ask it for "the QKV", "the FFN",
"the output layer"; nothing else in the model branches on sparsity."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.attention import CausalSelfAttention
from scaling_sparse.layers.dense import Dense, make_linear
from scaling_sparse.layers.ffn import DenseFF
from scaling_sparse.layers.output import DenseOutput
from scaling_sparse.layers.qkv import DenseQKV


def param_dtype(m):
    return jnp.dtype(m.param_dtype)


def make_qkv(m, rngs: nnx.Rngs, n_heads: int | None = None) -> nnx.Module:
    if m.attn_sparsity:
        from scaling_sparse.layers.sparse_qkv import SparseQKV
        return SparseQKV(m.d_model, m.attn_sparsity, length_kernel=m.attn_length_kernel, rngs=rngs,
                         conv_init=m.conv_init, param_dtype=param_dtype(m))
    # Shared-QK LSH attention reads no K: build none (docs/semantics.md §4).
    return DenseQKV(m.d_model, rngs=rngs, shared_qk=m.attention == "lsh", init=m.qkv_init,
                    param_dtype=param_dtype(m), d_inner=(n_heads or m.n_heads) * m.head_dim,
                    rank=m.factor_rank_attn)


def make_attn_output(m, rngs: nnx.Rngs, n_heads: int | None = None) -> nnx.Module | None:
    """Dense attention keeps its output projection; sparse QKV has none unless asked for."""
    if not m.attn_sparsity:
        return make_linear((n_heads or m.n_heads) * m.head_dim, m.d_model, rank=m.factor_rank_attn, rngs=rngs,
                           axes=("heads", "embed"), param_dtype=param_dtype(m))
    if m.attn_output == "dense":
        return Dense(m.d_model, m.d_model, rngs=rngs, axes=("heads", "embed"), param_dtype=param_dtype(m))
    if m.attn_output == "mult":
        from scaling_sparse.layers.multiplicative import MultiplicativeDense
        return MultiplicativeDense(m.d_model, m.d_model, m.attn_sparsity, rngs=rngs, out_axis="embed",
                                   param_dtype=param_dtype(m))
    return None


def make_attention(m, rngs: nnx.Rngs, n_heads: int | None = None) -> nnx.Module:
    """n_heads: this layer's heads (a CoFi-pruned model's differ per layer; default model.n_heads)."""
    n_heads = n_heads or m.n_heads
    lsh = None
    if m.attention == "lsh":  # Terraformer: LSH self-attention (layers/lsh.py)
        from scaling_sparse.layers.lsh import LSHAttention
        lsh = LSHAttention(chunk_len=m.lsh_chunk_len, n_buckets=m.lsh_n_buckets, n_hashes=m.lsh_n_hashes)
    return CausalSelfAttention(d_model=m.d_model, n_heads=n_heads, qkv=make_qkv(m, rngs, n_heads),
                               out=make_attn_output(m, rngs, n_heads), attn_dropout=m.attn_dropout, lsh=lsh,
                               d_head=m.head_dim)


def make_ffn(m, rngs: nnx.Rngs, d_ff: int | None = None) -> nnx.Module:
    """d_ff: this layer's FFN width (a CoFi-pruned model's differ per layer; default model.d_ff)."""
    main = _make_main_ffn(m, rngs, d_ff or m.d_ff)
    if m.ff_sru_units:  # Terraformer: a parallel SRU branch (layers/sru.py)
        from scaling_sparse.layers.sru import SRUFeedForward
        return SRUFeedForward(main, m.d_model, m.ff_sru_units, rngs=rngs, eps=m.layer_norm_eps,
                              param_dtype=param_dtype(m))
    return main


def _make_main_ffn(m, rngs: nnx.Rngs, d_ff: int) -> nnx.Module:
    if m.ff_sparsity:
        from scaling_sparse.layers.sparse_ffn import SparseFF
        return SparseFF(m.d_model, m.d_ff, m.ff_sparsity, lowrank=m.ff_rank,
                        temperature=m.ff_temperature, quant_prob=m.ff_quant_prob,
                        dropout_rate=m.dropout, rngs=rngs, param_dtype=param_dtype(m))
    return DenseFF(m.d_model, d_ff, rngs=rngs, dropout_rate=m.dropout, param_dtype=param_dtype(m),
                   rank=m.factor_rank_ff)


def make_output(m, rngs: nnx.Rngs) -> nnx.Module:
    if m.loss_type == "lowrank" and (m.loss_lowrank or m.loss_sparsity):
        from scaling_sparse.layers.sparse_output import LowRankOutput
        return LowRankOutput(m.d_model, m.vocab_size, m.loss_lowrank, rngs=rngs, param_dtype=param_dtype(m))
    if m.loss_sparsity:
        from scaling_sparse.layers.sparse_output import MultiplicativeOutput
        return MultiplicativeOutput(m.d_model, m.vocab_size, m.loss_sparsity, rngs=rngs,
                                    param_dtype=param_dtype(m))
    return DenseOutput(m.d_model, m.vocab_size, rngs=rngs, param_dtype=param_dtype(m))
