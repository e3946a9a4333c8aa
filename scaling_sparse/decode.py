"""Decoding: prefill, one-token step, the jitted generate loop and sampling.

Hot paths are pure functions of (params state, cache) under jax.jit: the NNX model is split once
into (graphdef, state) and merged inside the traced function, so no Python runs per token in the
loop. Caches are donated so XLA updates them in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def cast_params(state, dtype):
    """Cast floating parameters once to the decode dtype (not per token)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)


def sample_logits(logits: jax.Array, rng, *, temperature: float = 0.0, top_k: int = 0) -> jax.Array:
    """logits [batch, vocab] -> token ids [batch]. temperature 0 = greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Decoder:
    """Jitted prefill / step / loop for one model graph. Build once, call many times."""

    def __init__(self, graphdef, *, temperature: float = 0.0, top_k: int = 0):
        self.graphdef = graphdef
        self.sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)
        self.init_cache = jax.jit(self._init_cache, static_argnums=(1, 2))
        self.prefill = jax.jit(self._prefill, donate_argnums=(2,))
        self.step = jax.jit(self._step, donate_argnums=(1,))
        self.loop = jax.jit(self._loop, static_argnums=(5,), donate_argnums=(1,))

    def _model(self, state):
        return nnx.merge(self.graphdef, state)

    def _init_cache(self, state, batch, cache_len):
        return self._model(state).init_cache(batch, cache_len)

    def _prefill(self, state, prompt, cache, rng):
        """prompt [batch, P] -> (first sampled token [batch], cache)."""
        logits, cache = self._model(state).decode(prompt, cache, 0)
        return self.sample(logits[:, -1], rng), cache

    def _step(self, state, cache, token, index, rng):
        """One token at absolute position `index` -> (next token, cache)."""
        logits, cache = self._model(state).decode(token[:, None], cache, index)
        return self.sample(logits[:, -1], rng), cache

    def _loop(self, state, cache, token, index, rng, num_tokens: int):
        """Feeds `token` at `index`, then its successors: returns ([batch, num_tokens], cache)."""
        model = self._model(state)
        batch = token.shape[0]

        def body(i, carry):
            token, cache, out = carry
            logits, cache = model.decode(token[:, None], cache, index + i)
            token = self.sample(logits[:, -1], jax.random.fold_in(rng, i))
            return token, cache, out.at[:, i].set(token)

        out = jnp.zeros((batch, num_tokens), jnp.int32)
        _, cache, out = jax.lax.fori_loop(0, num_tokens, body, (token, cache, out))
        return out, cache


def generate(model: nnx.Module, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0, dtype=None):
    """prompt [batch, P] int -> [batch, max_new_tokens] generated ids (the whole loop jitted)."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    total = prompt.shape[1] + max_new_tokens
    if total > model.max_len:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds model.max_len {model.max_len}: shorten the prompt or ask for fewer tokens")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    graphdef, state = nnx.split(model)
    if dtype is not None:
        state = cast_params(state, dtype)
    decoder = Decoder(graphdef, temperature=temperature, top_k=top_k)
    rng = jax.random.PRNGKey(seed)
    cache = decoder.init_cache(state, prompt.shape[0], total)
    prefill_rng, rng = jax.random.split(rng)
    first, cache = decoder.prefill(state, prompt, cache, prefill_rng)
    if max_new_tokens == 1:
        return first[:, None]
    rest, _ = decoder.loop(state, cache, first, prompt.shape[1], rng, max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest], axis=1)
