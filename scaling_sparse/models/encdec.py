"""The paper's encoder-decoder (model.arch = "encdec"; docs/semantics.md §5): the T5-style
`ConfigurableTransformer` of trax's C4 experiments, built from the same layer factory as the
decoder-only model (decoder_lm.py).

  inputs [b, Li] (0 = padding) -> shared token embedding + encoder positions -> EncoderBlocks
    (dense bidirectional attention, the factory's FFN) -> LayerNorm = the encoder output
  decoder_inputs [b, Lt] (targets shifted right, starting with 0) -> shared token embedding +
    decoder positions -> CrossDecoderBlocks (causal self-attention from the factory, dense
    cross-attention, the factory's FFN) -> LayerNorm -> the factory's output layer -> logits

Decoding: `prefill(inputs, cache_len)` runs the encoder once, projects every decoder layer's cross
K/V once (the cache's "cross" memory) and feeds the decoder-start token 0 at position 0; each
`decode(tokens, cache, index)` step then reads only the decoder's weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling_sparse.config import ModelConfig
from scaling_sparse.layers.base import COMPONENTS, check_mode, param, param_count
from scaling_sparse.layers.dropout import dropout
from scaling_sparse.layers.embedding import embedding_init, sinusoidal_init
from scaling_sparse.layers.encdec_block import CrossDecoderBlock, EncoderBlock
from scaling_sparse.layers.factory import make_output
from scaling_sparse.layers.norm import LayerNorm
from scaling_sparse.quantize import take_rows

DECODER_START_ID = 0  # T5's: the pad id starts every decoder input


class EncoderDecoderLM(nnx.Module):
    prompt_in_decoder = False  # generation: the prompt is the encoder's input (decode.py)
    INT8_AXES = {"token_embed": (1,), "encoder_pos_embed": (1,), "pos_embed": (1,)}  # int8: a scale per row

    def __init__(self, m, *, rngs: nnx.Rngs):
        m = ModelConfig.from_config(m)
        pdt = jnp.dtype(m.param_dtype)
        # One embedding shared by the encoder and the decoder (the reference's shared in/out embedder).
        self.token_embed = param(embedding_init(rngs.params(), (m.vocab_size, m.d_model), pdt, m.embed_init),
                                 "vocab", "embed")
        self.encoder_pos_embed = param(jnp.asarray(sinusoidal_init(m.max_len, m.d_model), pdt), "length", "embed")
        self.pos_embed = param(jnp.asarray(sinusoidal_init(m.max_len, m.d_model), pdt), "length", "embed")
        self.encoder = nnx.List([EncoderBlock(m, rngs=rngs) for _ in range(m.encoder_layers)])
        self.encoder_norm = LayerNorm(m.d_model, eps=m.layer_norm_eps)
        self.decoder = nnx.List([CrossDecoderBlock(m, rngs=rngs) for _ in range(m.n_layers)])
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

    def encode(self, inputs: jax.Array, *, mode: str = "eval", rng=None):
        """inputs [b, Li] (0 = padding) -> (encoder output [b, Li, d], mask [b, Li] True = real token)."""
        train = check_mode(mode)
        self._check_length(inputs.shape[1], "an encoder input")
        mask = inputs != 0
        x = self._embed(inputs, jnp.arange(inputs.shape[1]), self.encoder_pos_embed)
        keys = jax.random.split(rng, len(self.encoder) + 1) if train else [None] * (len(self.encoder) + 1)
        x = dropout(x, self.dropout_rate, keys[-1], train=train)
        for block, key in zip(self.encoder, keys):
            x = block(x, mask, mode=mode, rng=key)
        return self.encoder_norm(x), mask

    def __call__(self, inputs: jax.Array, decoder_inputs: jax.Array, *, mode: str = "eval", rng=None):
        """-> logits [b, Lt, vocab] (float32) for every decoder position."""
        train = check_mode(mode)
        if train and rng is None:
            raise ValueError("mode='train' needs rng=<PRNG key>")
        self._check_length(decoder_inputs.shape[1], "a decoder input")
        encoder_rng, embed_rng, decoder_rng = jax.random.split(rng, 3) if train else (None, None, None)
        encoded, mask = self.encode(inputs, mode=mode, rng=encoder_rng)
        x = self._embed(decoder_inputs, jnp.arange(decoder_inputs.shape[1]), self.pos_embed)
        x = dropout(x, self.dropout_rate, embed_rng, train=train)
        for i, block in enumerate(self.decoder):
            memory = block.cross.memory(encoded, mask)
            x = block(x, memory, mode=mode, rng=None if decoder_rng is None else jax.random.fold_in(decoder_rng, i))
        return self.output(self.final_norm(x)).astype(jnp.float32)

    def logits(self, batch: dict, *, mode: str = "eval", rng=None) -> jax.Array:
        """The training loop's entry point: a span-corruption batch (data/pipeline.py) -> logits."""
        return self(batch["inputs"], batch["decoder_inputs"], mode=mode, rng=rng)

    # -- decoding -----------------------------------------------------------------------------------
    def start_cache(self, inputs: jax.Array, cache_len: int, dtype=None):
        """Runs the encoder once -> the decode cache of every decoder layer (self-attention and FFN
        state for `cache_len` positions, cross-attention K/V memory)."""
        self._check_length(cache_len, "a decode cache")
        dtype = dtype or self.dtype
        encoded, mask = self.encode(inputs)
        return [block.init_cache(block.cross.memory(encoded, mask, dtype), cache_len, dtype) for block in self.decoder]

    def decode(self, tokens: jax.Array, cache, index):
        """Decoder tokens [b, T] at positions index..index+T-1 -> (logits [b, T, vocab], cache)."""
        x = self._embed(tokens, index + jnp.arange(tokens.shape[1]), self.pos_embed)
        new_cache = []
        for block, block_cache in zip(self.decoder, cache):
            x, block_cache = block.decode(x, block_cache, index)
            new_cache.append(block_cache)
        return self.output(self.final_norm(x)).astype(jnp.float32), new_cache

    def prefill(self, prompt: jax.Array, cache_len: int):
        """Generation's start (decode.py): the prompt is the encoder input; the decoder starts from
        token 0 at position 0 -> (logits of the first generated token [b, vocab], cache, next index 1)."""
        cache = self.start_cache(prompt, cache_len)
        start = jnp.full((prompt.shape[0], 1), DECODER_START_ID, jnp.int32)
        logits, cache = self.decode(start, cache, 0)
        return logits[:, -1], cache, 1

    def components(self) -> dict[str, dict[str, int]]:
        """Per component: total parameters and parameters read per decoded token. The encoder's
        weights count in the totals; a decoded token reads none of them (the encoder runs once)."""
        d = self.token_embed.shape[1]
        report = {kind: {"total": 0, "per_token": 0} for kind in COMPONENTS}
        report["embedding"] = {"total": self.token_embed.size + self.pos_embed.size + self.encoder_pos_embed.size,
                               "per_token": 2 * d}
        report["norms"]["total"] += param_count(self.encoder_norm)
        for block in self.encoder:
            for child in vars(block).values():
                if isinstance(child, nnx.Module):
                    report[child.component]["total"] += param_count(child)
        layers = [self.final_norm, self.output]
        for block in self.decoder:
            layers += [child for child in vars(block).values() if isinstance(child, nnx.Module)]
        for layer in layers:
            report[layer.component]["total"] += param_count(layer)
            report[layer.component]["per_token"] += layer.params_per_token()
        return report


def decoder_inputs_for(targets: np.ndarray) -> np.ndarray:
    """targets [b, L] -> decoder inputs: shifted right by one, DECODER_START_ID first (tests, tools)."""
    targets = np.asarray(targets)
    return np.concatenate([np.full((targets.shape[0], 1), DECODER_START_ID, targets.dtype), targets[:, :-1]], 1)
