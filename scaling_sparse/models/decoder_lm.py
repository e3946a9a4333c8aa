"""The decoder-only LM (model.arch = "decoder"). Dense and sparse share this code: the config picks
each layer's variant through layers/factory.py, and the stack (standard or reversible) through
`make_stack`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.config import ModelConfig
from scaling_sparse.layers.base import COMPONENTS, check_mode, param, param_count
from scaling_sparse.layers.dropout import dropout
from scaling_sparse.layers.embedding import embedding_init, sinusoidal_init
from scaling_sparse.layers.factory import make_output
from scaling_sparse.layers.norm import LayerNorm
from scaling_sparse.layers.reversible import ReversibleStack
from scaling_sparse.layers.stack import StandardStack
from scaling_sparse.quantize import take_rows


def make_stack(m, rngs: nnx.Rngs) -> nnx.Module:
    return ReversibleStack(m, rngs=rngs) if m.reversible else StandardStack(m, rngs=rngs)


class DecoderLM(nnx.Module):
    prompt_in_decoder = True  # generation: the prompt is prefilled into the decoder (decode.py)
    INT8_AXES = {"token_embed": (1,), "pos_embed": (1,)}  # int8 (quantize.py): a scale per embedding row

    def __init__(self, m, *, rngs: nnx.Rngs):
        m = ModelConfig.from_config(m)
        pdt = jnp.dtype(m.param_dtype)
        # Uniform with std 1/sqrt(d) by default; no sqrt(d) scaling of the embeddings (docs/semantics.md §5b).
        self.token_embed = param(embedding_init(rngs.params(), (m.vocab_size, m.d_model), pdt, m.embed_init),
                                 "vocab", "embed")
        self.pos_embed = param(jnp.asarray(sinusoidal_init(m.max_len, m.d_model), pdt), "length", "embed")
        self.stack = make_stack(m, rngs)
        self.final_norm = LayerNorm(m.d_model, eps=m.layer_norm_eps)
        self.output = make_output(m, rngs)
        self.dtype = jnp.dtype(m.dtype)
        self.max_len = m.max_len
        self.vocab_size = m.vocab_size
        self.dropout_rate = m.dropout

    def _embed(self, tokens, positions):
        x = take_rows(self.token_embed, tokens) + take_rows(self.pos_embed, positions)
        return x.astype(self.dtype)

    def __call__(self, tokens: jax.Array, *, mode: str = "eval", rng=None, features: bool = False):
        """tokens [batch, T] -> logits [batch, T, vocab] (float32), causal. features=True: (logits, g) with
        g [batch, T, d_model] the last block's LayerNorm output before its FFN (TRIME's key and query,
        trime_loss.py), taken from the same pass."""
        train = check_mode(mode)
        if train and rng is None:
            raise ValueError("mode='train' needs rng=<PRNG key>")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds model.max_len {self.max_len}")
        embed_rng, stack_rng = jax.random.split(rng) if train else (None, None)
        x = self._embed(tokens, jnp.arange(tokens.shape[1]))
        x = dropout(x, self.dropout_rate, embed_rng, train=train)
        if features:
            x, g = self.stack(x, mode=mode, rng=stack_rng, features=True)
            return self.output(self.final_norm(x)).astype(jnp.float32), g
        x = self.stack(x, mode=mode, rng=stack_rng)
        return self.output(self.final_norm(x)).astype(jnp.float32)

    def logits(self, batch: dict, *, mode: str = "eval", rng=None, features: bool = False):
        """The training loop's entry point: a language-model batch (data/pipeline.py) -> logits, or
        (logits, features) (TRIME)."""
        return self(batch["inputs"], mode=mode, rng=rng, features=features)

    def prefill(self, prompt: jax.Array, cache_len: int):
        """Generation's start (decode.py): the prompt through the decoder -> (logits of the first
        generated token [b, vocab], cache, next index)."""
        logits, cache = self.decode(prompt, self.init_cache(prompt.shape[0], cache_len), 0)
        return logits[:, -1], cache, prompt.shape[1]

    def init_cache(self, batch: int, cache_len: int, dtype=None):
        if cache_len > self.max_len:
            raise ValueError(f"cache of {cache_len} positions exceeds model.max_len {self.max_len}")
        return self.stack.init_cache(batch, cache_len, dtype or self.dtype)

    def decode(self, tokens: jax.Array, cache, index):
        """tokens [batch, T] at absolute positions index..index+T-1 -> (logits [batch, T, vocab], cache)."""
        x = self._embed(tokens, index + jnp.arange(tokens.shape[1]))
        x, cache = self.stack.decode(x, cache, index)
        return self.output(self.final_norm(x)).astype(jnp.float32), cache

    def components(self) -> dict[str, dict[str, int]]:
        """Per component: total parameters and parameters read per decoded token. Each layer says
        which component it belongs to (its `component`); the blocks' direct children are asked."""
        d = self.token_embed.shape[1]
        report = {kind: {"total": 0, "per_token": 0} for kind in COMPONENTS}
        report["embedding"] = {"total": self.token_embed.size + self.pos_embed.size, "per_token": 2 * d}
        layers = [self.final_norm, self.output]
        for block in self.stack.blocks:
            layers += [child for child in vars(block).values() if isinstance(child, nnx.Module)]
        for layer in layers:
            report[layer.component]["total"] += param_count(layer)
            report[layer.component]["per_token"] += layer.params_per_token()
        return report
