"""The dense decoder's forward pass as a pure function of its params, with CoFi's masks
(docs/compression.md). It mirrors models.DecoderLM with layers/block.DecoderBlock (pre-LayerNorm,
causal softmax attention, ReLU FFN) exactly; with every mask 1 it equals the model's eval pass
(tests/test_compress_cofi.py), and a model pruned by cofi.prune equals it at the masks pruned.

Masks (float arrays; 0 = pruned):
  head [L, H]   each head's attention context before the output projection
  attn [L]      the whole attention sub-layer's output
  int  [L, f]   each FFN unit, relu(x W_in) per unit
  ffn  [L]      the whole FFN sub-layer's output
  hidden [d]    the residual stream's dimensions: the embeddings and every sub-layer's output; every
                LayerNorm takes its statistics over the kept (non-zero) dimensions only and outputs 0 on
                the others, as CoFi's CoFiLayerNorm, so removing those dimensions changes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def full_masks(m) -> dict:
    """Every mask 1: the unpruned model."""
    return {"head": jnp.ones((m.n_layers, m.n_heads)), "attn": jnp.ones((m.n_layers,)),
            "int": jnp.ones((m.n_layers, m.d_ff)), "ffn": jnp.ones((m.n_layers,)), "hidden": jnp.ones((m.d_model,))}


def layer_norm(x, p, eps: float, keep):
    """layers/norm.py's LayerNorm over the dimensions where keep == 1, 0 elsewhere."""
    x32 = x.astype(jnp.float32)
    n = keep.sum()
    mean = (x32 * keep).sum(-1, keepdims=True) / n
    var = (jnp.square(x32 - mean) * keep).sum(-1, keepdims=True) / n
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"] + p["bias"]) * keep


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def attention(h, p, n_heads: int, head_mask):
    """Causal multi-head attention as layers/attention.py's, each head's context times its mask."""
    b, t, _ = h.shape
    q, k, v = (_dense(h, p["qkv"][name]).reshape(b, t, n_heads, -1) for name in ("q", "k", "v"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    o = o * head_mask[None, None, :, None]
    return _dense(o.reshape(b, t, -1), p["out"])


def forward(params: dict, tokens, masks: dict, m):
    """tokens [b, T] -> (logits [b, T, vocab] float32, hidden states after each layer [L, b, T, d])."""
    zh = masks["hidden"]
    keep = (zh != 0).astype(jnp.float32)
    t = tokens.shape[1]
    x = (jnp.take(params["token_embed"], tokens, axis=0) + params["pos_embed"][:t]) * zh
    blocks = params["stack"]["blocks"]
    hidden = []
    for i in range(m.n_layers):
        p = blocks[i]
        h = layer_norm(x, p["attn_norm"], m.layer_norm_eps, keep)
        x = x + attention(h, p["attn"], m.n_heads, masks["head"][i]) * masks["attn"][i] * zh
        h = layer_norm(x, p["ffn_norm"], m.layer_norm_eps, keep)
        u = jax.nn.relu(_dense(h, p["ffn"]["w_in"])) * masks["int"][i]
        x = x + _dense(u, p["ffn"]["w_out"]) * masks["ffn"][i] * zh
        hidden.append(x)
    logits = _dense(layer_norm(x, params["final_norm"], m.layer_norm_eps, keep), params["output"])
    return logits.astype(jnp.float32), jnp.stack(hidden)
