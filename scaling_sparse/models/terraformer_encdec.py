"""The Terraformer as the reference trains it on C4 (model.arch = "encdec" with model.reversible;
trax terraformer.py `ConfigurableTerraformer`, docs/semantics.md §4, §5):

  inputs [b, Li] -> shared token embedding + encoder positions -> two copies -> reversible encoder
    blocks (dense bidirectional attention, FFN) -> the encoder's two streams (e1, e2)
  decoder_inputs [b, Lt] -> shared token embedding + decoder positions = d
  each encoder stream concatenated with d, the encoder's padding moved to the end
    (trax `ConcatWithPadding2`): s1 = [e1 real positions; d; 0...], s2 = [e2 real positions; d; 0...]
  -> reversible decoder blocks over the concatenation (causal self-attention: multiplicative +
    convolution with sparse QKV, LSH as an option; two attention and one FFN half-residual per
    block) -> average of the streams -> LayerNorm -> the decoder positions only
    (`StripFromConcatenateWithPadding`) -> the factory's output layer.
No cross-attention: the decoder attends to the encoder's positions as a prefix.

Decoding: the prompt (an unpadded encoder input) is encoded once and its two streams are prefilled
into the decoder's caches as the prefix; decoder token t then sits at cache position Li + t and
decoder position t (its positional embedding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.config import ModelConfig
from scaling_sparse.layers.base import COMPONENTS, check_mode, param, param_count
from scaling_sparse.layers.dropout import dropout
from scaling_sparse.layers.embedding import embedding_init, sinusoidal_init
from scaling_sparse.layers.encdec_block import ReversibleEncoderBlock
from scaling_sparse.layers.factory import make_output
from scaling_sparse.layers.norm import LayerNorm
from scaling_sparse.layers.reversible import ReversibleStack
from scaling_sparse.quantize import take_rows

DECODER_START_ID = 0


def concat_with_padding(prefix, lengths, x):
    """prefix [b, Li, d] with lengths[i] real positions, x [b, Lt, d] -> [b, Li + Lt, d]: row i holds
    prefix[i, :n_i], then x[i], then zeros (the prefix's padding moved to the end)."""
    b, li, _ = prefix.shape
    lt = x.shape[1]
    pos = jnp.arange(li + lt)[None, :]                                   # [1, Li + Lt]
    n = lengths[:, None]
    from_prefix = jnp.take_along_axis(prefix, jnp.minimum(pos, li - 1)[..., None].repeat(b, 0), axis=1)
    from_x = jnp.take_along_axis(x, jnp.clip(pos - n, 0, lt - 1)[..., None], axis=1)
    out = jnp.where((pos < n)[..., None], from_prefix, from_x)
    return jnp.where((pos < n + lt)[..., None], out, 0).astype(x.dtype)


def strip_prefix(y, lengths, lt: int):
    """The inverse cut: y [b, Li + Lt, d] -> the Lt positions after each row's prefix, [b, Lt, d]."""
    index = lengths[:, None] + jnp.arange(lt)[None, :]
    return jnp.take_along_axis(y, index[..., None], axis=1)


class TerraformerEncDecLM(nnx.Module):
    prompt_in_decoder = False  # generation: the prompt is the encoder's input (decode.py)
    INT8_AXES = {"token_embed": (1,), "encoder_pos_embed": (1,), "pos_embed": (1,)}  # int8: a scale per row

    def __init__(self, m, *, rngs: nnx.Rngs):
        m = ModelConfig.from_config(m)
        pdt = jnp.dtype(m.param_dtype)
        self.token_embed = param(embedding_init(rngs.params(), (m.vocab_size, m.d_model), pdt, m.embed_init),
                                 "vocab", "embed")
        self.encoder_pos_embed = param(jnp.asarray(sinusoidal_init(m.max_len, m.d_model), pdt), "length", "embed")
        self.pos_embed = param(jnp.asarray(sinusoidal_init(m.max_len, m.d_model), pdt), "length", "embed")
        self.encoder = ReversibleStack(m, rngs=rngs, block=ReversibleEncoderBlock, n_layers=m.encoder_layers)
        self.stack = ReversibleStack(m, rngs=rngs)
        self.final_norm = LayerNorm(m.d_model, eps=m.layer_norm_eps)
        self.output = make_output(m, rngs)
        self.dtype = jnp.dtype(m.dtype)
        self.max_len = m.max_len
        self.vocab_size = m.vocab_size
        self.dropout_rate = m.dropout

    def _embed(self, tokens, positions, table):
        x = take_rows(self.token_embed, tokens) + take_rows(table, positions)
        return x.astype(self.dtype)

    def _check_length(self, length: int, what: str):
        if length > self.max_len:
            raise ValueError(f"{what} of {length} tokens exceeds model.max_len {self.max_len}")

    def encode(self, inputs, *, mode: str = "eval", rng=None):
        """inputs [b, Li] (0 = padding) -> (stream 1, stream 2 [b, Li, d], real lengths [b])."""
        train = check_mode(mode)
        self._check_length(inputs.shape[1], "an encoder input")
        mask = inputs != 0
        embed_rng, stack_rng = jax.random.split(rng) if train else (None, None)
        x = self._embed(inputs, jnp.arange(inputs.shape[1]), self.encoder_pos_embed)
        x = dropout(x, self.dropout_rate, embed_rng, train=train)
        e1, e2 = self.encoder.streams(x, x, mode=mode, rng=stack_rng, context=mask)
        return e1, e2, jnp.sum(mask, axis=1).astype(jnp.int32)

    def __call__(self, inputs, decoder_inputs, *, mode: str = "eval", rng=None):
        train = check_mode(mode)
        if train and rng is None:
            raise ValueError("mode='train' needs rng=<PRNG key>")
        lt = decoder_inputs.shape[1]
        self._check_length(lt, "a decoder input")
        encoder_rng, embed_rng, stack_rng = jax.random.split(rng, 3) if train else (None, None, None)
        e1, e2, lengths = self.encode(inputs, mode=mode, rng=encoder_rng)
        d = self._embed(decoder_inputs, jnp.arange(lt), self.pos_embed)
        d = dropout(d, self.dropout_rate, embed_rng, train=train)
        s1, s2 = concat_with_padding(e1, lengths, d), concat_with_padding(e2, lengths, d)
        y1, y2 = self.stack.streams(s1, s2, mode=mode, rng=stack_rng)
        y = strip_prefix((y1 + y2) / 2, lengths, lt)
        return self.output(self.final_norm(y)).astype(jnp.float32)

    def logits(self, batch: dict, *, mode: str = "eval", rng=None):
        return self(batch["inputs"], batch["decoder_inputs"], mode=mode, rng=rng)

    # -- decoding -----------------------------------------------------------------------------------
    def start_cache(self, inputs, cache_len: int, dtype=None):
        """Encodes the (unpadded) inputs once and prefills their streams as the decoder's prefix ->
        the decode cache for `cache_len` decoder positions after it."""
        self._check_length(cache_len, "a decode cache")
        dtype = dtype or self.dtype
        e1, e2, _ = self.encode(inputs)
        prefix = inputs.shape[1]
        cache = self.stack.init_cache(inputs.shape[0], prefix + cache_len, dtype)
        _, _, cache = self.stack.decode_streams(e1, e2, cache, 0)
        return {"stack": cache, "prefix": jnp.asarray(prefix, jnp.int32)}

    def decode(self, tokens, cache, index):
        """Decoder tokens [b, T] at decoder positions index.. -> (logits [b, T, vocab], cache)."""
        x = self._embed(tokens, index + jnp.arange(tokens.shape[1]), self.pos_embed)
        y1, y2, stack_cache = self.stack.decode_streams(x, x, cache["stack"], cache["prefix"] + index)
        logits = self.output(self.final_norm((y1 + y2) / 2)).astype(jnp.float32)
        return logits, {"stack": stack_cache, "prefix": cache["prefix"]}

    def prefill(self, prompt, cache_len: int):
        cache = self.start_cache(prompt, cache_len)
        start = jnp.full((prompt.shape[0], 1), DECODER_START_ID, jnp.int32)
        logits, cache = self.decode(start, cache, 0)
        return logits[:, -1], cache, 1

    def components(self) -> dict[str, dict[str, int]]:
        """As EncoderDecoderLM.components: the encoder counts in the totals, not per decoded token."""
        d = self.token_embed.shape[1]
        report = {kind: {"total": 0, "per_token": 0} for kind in COMPONENTS}
        report["embedding"] = {"total": self.token_embed.size + self.pos_embed.size + self.encoder_pos_embed.size,
                               "per_token": 2 * d}
        for block in self.encoder.blocks:
            for child in vars(block).values():
                if isinstance(child, nnx.Module):
                    report[child.component]["total"] += param_count(child)
        layers = [self.final_norm, self.output]
        for block in self.stack.blocks:
            layers += [child for child in vars(block).values() if isinstance(child, nnx.Module)]
        for layer in layers:
            report[layer.component]["total"] += param_count(layer)
            report[layer.component]["per_token"] += layer.params_per_token()
        return report
