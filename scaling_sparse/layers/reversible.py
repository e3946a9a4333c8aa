"""Reversible residual stack (RevNet style), the Terraformer's decoder body (docs/semantics.md §4).

Two streams start as copies of the embeddings. Every sub-layer is a half-residual followed by a
swap: (a, b) -> (b + F(LN a), a). A block is three of them: attention, attention, FFN. The stack
returns the average of the two streams (the model's final LayerNorm follows).

Training memory: a `jax.custom_vjp` over the whole stack keeps only the final two streams. The
blocks' weights are stacked and run in a `lax.scan` (forwards and backwards). The backward pass
walks the sub-layers in reverse, rebuilding each input from its output
(a = y2, b = y1 - F(y2)) and taking `jax.vjp` of F at the rebuilt input, so activation memory does
not grow with depth (benchmarks/train_memory.py measures it). F is a pure function of
(block state, input, key) through nnx.split / nnx.merge; every sub-layer's randomness (dropout,
the sparse FFN's hard/soft draw, LSH rotations) comes from a key derived from the block's key and
the sub-layer index, so the recomputation replays the forward pass's randomness.

Mask memory: the rebuilt inputs equal the forward pass's only to float rounding, so a controller
near a tie could pick another unit, and a hash near a bucket boundary another bucket, when
recomputed. The forward pass therefore stores each sparse FFN's chosen units (uint8
[batch, T, d_ff / N]) and each LSH attention's bucket assignments (int32 [batch, heads, n_hashes,
T]), a few bytes per token and layer next to the two d_model streams, and the recomputation reuses
them, as the reference does: masks and buckets are identical by construction.

Decoding runs the same half-residuals forwards (no recomputation), with each attention/FFN cache.
`recompute=False` computes the same network with plain autodiff (stores activations); the tests
compare the two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.base import check_mode
from scaling_sparse.layers.block import ffn_features, ffn_norm_for, pre_norm
from scaling_sparse.layers.factory import make_attention, make_ffn
from scaling_sparse.layers.norm import LayerNorm

SUBLAYERS = ("attn1", "attn2", "ffn")


class ReversibleBlock(nnx.Module):
    """Three half-residual sub-layers: attention, attention, FFN (each with its own LayerNorm; an SRU
    FFN normalises the raw stream itself, layers/sru.py)."""

    SUBLAYERS = SUBLAYERS

    def __init__(self, m, *, rngs: nnx.Rngs):
        self.attn1_norm = LayerNorm(m.d_model, eps=m.layer_norm_eps)
        self.attn1 = make_attention(m, rngs)
        self.attn2_norm = LayerNorm(m.d_model, eps=m.layer_norm_eps)
        self.attn2 = make_attention(m, rngs)
        self.ffn = make_ffn(m, rngs)
        self.ffn_norm = ffn_norm_for(self.ffn, m)

    def _sublayer(self, i: int):
        name = self.SUBLAYERS[i]
        return getattr(self, f"{name}_norm"), getattr(self, name)

    def _call_attention(self, layer, x, *, mode, rng, context, **kwargs):
        """A causal attention sub-layer ignores `context` (the encoder's block passes its mask)."""
        return layer(x, mode=mode, rng=rng, **kwargs)

    def _sparse_ff(self):
        """The sparse FFN of the FFN sub-layer (also inside an SRU wrapper), else None."""
        from scaling_sparse.layers.sparse_ffn import SparseFF

        ffn = getattr(self.ffn, "main", self.ffn)
        return ffn if isinstance(ffn, SparseFF) else None

    def residual(self, i: int, a, *, mode: str, rng=None, memory=None, context=None):
        """(F_i(a), memory). No dropout on the half-residual itself: the reference's reversible
        attention half-residual has no output dropout, and its FFN half-residual drops only the sparse
        FFN's output, inside SparseFF (trax terraformer.py; docs/semantics.md §4).

        Memory, in training: what the recomputation must replay exactly although its rebuilt input
        differs from the forward pass's by float rounding (a choice near a tie could flip): the sparse
        FFN's chosen units, or an LSH attention's bucket assignments. Computed here, or reused when
        `memory` is passed; None for sub-layers with neither. `context`: the encoder's padding mask
        (ReversibleEncoderBlock), None in the decoder."""
        train = check_mode(mode)
        norm, layer = self._sublayer(i)
        x = pre_norm(norm, a)
        if self.SUBLAYERS[i] == "ffn":
            if train and self._sparse_ff() is not None:
                memory = layer.train_choice(x, rng) if memory is None else memory
                return layer(x, mode=mode, rng=rng, choice=memory), memory
            return layer(x, mode=mode, rng=rng), None
        if train and getattr(layer, "lsh", None) is not None:
            memory = layer.lsh_buckets(x, mode=mode, rng=rng) if memory is None else memory
            return self._call_attention(layer, x, mode=mode, rng=rng, context=context, buckets=memory), memory
        return self._call_attention(layer, x, mode=mode, rng=rng, context=context), None

    def init_cache(self, batch: int, cache_len: int, dtype):
        return {name: self._sublayer(i)[1].init_cache(batch, cache_len, dtype)
                for i, name in enumerate(self.SUBLAYERS)}

    def decode(self, x1, x2, cache, index):
        new_cache = {}
        for i, name in enumerate(self.SUBLAYERS):
            norm, layer = self._sublayer(i)
            h, new_cache[name] = layer.decode(pre_norm(norm, x1), cache[name], index)
            x1, x2 = x2 + h, x1
        return x1, x2, new_cache


def _sublayer_key(block_key, i):
    return None if block_key is None else jax.random.fold_in(block_key, i)


def _residual_fn(graphdef, i: int, mode: str, context=None):
    """F_i as a pure function of (block state, a, block key, stored memory) -> (F_i(a), memory)."""

    def f(state, a, block_key, memory=None):
        return nnx.merge(graphdef, state).residual(i, a, mode=mode, rng=_sublayer_key(block_key, i), memory=memory,
                                                   context=context)

    return f


def _block_forward(graphdef, mode, context, n_sublayers, carry, block):
    """One block's half-residuals -> ((x1, x2), the block's mask memory per sub-layer)."""
    x1, x2 = carry
    state, key = block
    memory = []
    for i in range(n_sublayers):
        h, choice = _residual_fn(graphdef, i, mode, context)(state, x1, key)
        x1, x2 = x2 + h, x1
        memory.append(choice)
    return (x1, x2), tuple(memory)


def _forward(graphdef, mode, x1, x2, states, keys, context, n_sublayers):
    """-> (x1, x2, mask memory: per sub-layer, the sparse FFN's choices stacked over blocks, or None)."""
    (x1, x2), memory = jax.lax.scan(
        lambda carry, block: _block_forward(graphdef, mode, context, n_sublayers, carry, block), (x1, x2),
        (states, keys))
    return x1, x2, memory


def _add(a, b):
    return jax.tree.map(lambda u, v: u + v, a, b)


def reversible_apply(graphdef, mode: str, x1, x2, states, keys, *, recompute: bool = True, context=None,
                     n_sublayers: int = len(SUBLAYERS)):
    """Runs the blocks on the two streams; returns the final (x1, x2). `states` holds every block's
    state stacked on a leading axis (blocks share `graphdef`), `keys` one key per block (or None),
    `context` non-differentiable data every block reads (the encoder's padding mask, or None).

    The blocks run in a `lax.scan`, forwards and in the backward pass, so one compiled block body
    serves every layer and the buffers of one step are reused by the next: peak memory does not
    depend on how XLA would schedule and pack an unrolled program (with 48 unrolled layers its
    allocation grew with depth). With recompute=True the backward pass rebuilds activations instead
    of storing them."""
    if not recompute:
        return _forward(graphdef, mode, x1, x2, states, keys, context, n_sublayers)[:2]

    @jax.custom_vjp
    def run(x1, x2, states, keys, context):
        return _forward(graphdef, mode, x1, x2, states, keys, context, n_sublayers)[:2]

    def run_fwd(x1, x2, states, keys, context):
        y1, y2, memory = _forward(graphdef, mode, x1, x2, states, keys, context, n_sublayers)
        # No activations: outputs and mask memory only.
        return (y1, y2), (y1, y2, states, keys, memory, context)

    def backward(context, carry, block):
        y1, y2, dy1, dy2 = carry
        state, key, memory = block
        dstate = None
        for i in reversed(range(n_sublayers)):
            # Forward was (a, b) -> (y1, y2) = (b + F(a), a): rebuild a and b, then back-propagate.
            a = y2
            f = _residual_fn(graphdef, i, mode, context)
            f_out, f_vjp = jax.vjp(lambda s, a_: f(s, a_, key, memory[i])[0], state, a)
            b = y1 - f_out
            ds, da = f_vjp(dy1)
            dstate = ds if dstate is None else _add(dstate, ds)
            y1, y2, dy1, dy2 = a, b, dy2 + da, dy1
        return (y1, y2, dy1, dy2), dstate

    def run_bwd(residuals, cotangents):
        y1, y2, states, keys, memory, context = residuals
        (_, _, dx1, dx2), dstates = jax.lax.scan(lambda carry, block: backward(context, carry, block),
                                                 (y1, y2, *cotangents), (states, keys, memory), reverse=True)
        return dx1, dx2, dstates, None, None  # keys and context are data: None = a zero cotangent

    run.defvjp(run_fwd, run_bwd)
    return run(x1, x2, states, keys, context)


class ReversibleStack(nnx.Module):
    """Stack protocol of layers/stack.py: __call__(x, mode, rng), init_cache, decode, `blocks`.
    `streams` / `decode_streams` take and return the two streams (the encoder-decoder Terraformer
    hands its encoder's streams to its decoder, models/terraformer_encdec.py)."""

    def __init__(self, m, *, rngs: nnx.Rngs, recompute: bool = True, block=None, n_layers: int | None = None):
        block = block or ReversibleBlock
        self.blocks = nnx.List([block(m, rngs=rngs) for _ in range(m.n_layers if n_layers is None else n_layers)])
        self.recompute = recompute

    def __call__(self, x, *, mode: str = "eval", rng=None, features: bool = False):
        """-> the streams' average, or (it, the last block's FFN LayerNorm output) with features=True
        (TRIME). The FFN is the last half-residual, (a, b) -> (b + F(LN a), a), so its input stream a is
        the second output stream: no second pass and nothing stored."""
        x1, x2 = self.streams(x, x, mode=mode, rng=rng)
        if not features:
            return (x1 + x2) / 2
        last = self.blocks[-1]
        if last.SUBLAYERS[-1] != "ffn":
            raise ValueError("TRIME's features need a block whose last sub-layer is its FFN")
        return (x1 + x2) / 2, ffn_features(last.ffn_norm, last.ffn, x2)

    def streams(self, x1, x2, *, mode: str = "eval", rng=None, context=None):
        """(x1, x2) through every block -> (y1, y2); `context` reaches every block (the encoder's mask)."""
        train = check_mode(mode)
        if train and rng is None:
            raise ValueError("ReversibleStack in train mode needs an rng key")
        graphdefs, states = zip(*(nnx.split(block) for block in self.blocks))
        if any(g != graphdefs[0] for g in graphdefs[1:]):
            raise ValueError("ReversibleStack: the blocks differ in structure; the scan needs identical blocks")
        # Stacking copies the block weights once per call (their size, not the activations').
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        keys = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(len(self.blocks))) if train else None
        return reversible_apply(graphdefs[0], mode, x1, x2, stacked, keys, recompute=self.recompute, context=context,
                                n_sublayers=len(self.blocks[0].SUBLAYERS))

    def init_cache(self, batch: int, cache_len: int, dtype):
        return [block.init_cache(batch, cache_len, dtype) for block in self.blocks]

    def decode(self, x, cache, index):
        x1, x2, new_cache = self.decode_streams(x, x, cache, index)
        return (x1 + x2) / 2, new_cache

    def decode_streams(self, x1, x2, cache, index):
        new_cache = []
        for block, block_cache in zip(self.blocks, cache):
            x1, x2, block_cache = block.decode(x1, x2, block_cache, index)
            new_cache.append(block_cache)
        return x1, x2, new_cache
