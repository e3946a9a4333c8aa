"""Decoding: prefill, one-token step, the jitted generate loop and sampling.

One path from a checkpoint to tokens: the loaders (train.load_params, state.init_params) return
the split model (graphdef, params); `Decoder` holds it and runs pure functions of
(params, cache) under jax.jit, merging the model inside the traced function, so no Python runs per
token in the loop. Caches are donated so XLA updates them in place. Parameters may be sharded
(tensor-parallel for models too big for one device): the jitted functions take them as they are
and return replicated tokens, so a sharded model decodes the same tokens as an unsharded one.

`check_request` is the one place the prompt / length checks live.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling_sparse.kernels import cpu as cpu_kernels
from scaling_sparse.layers.argmax import first_argmax
from scaling_sparse.state import cast_floating


def check_request(prompt_len: int, max_new_tokens: int, max_len: int, *, prompt_in_decoder: bool = True) -> None:
    """Raises ValueError naming the problem and the fix for a prompt the model cannot continue.
    `prompt_in_decoder` False: an encoder-decoder, whose prompt (the encoder input) and output each
    have max_len positions of their own."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty: give at least one token of text")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt_in_decoder:
        if prompt_len > max_len:
            raise ValueError(f"the prompt ({prompt_len} tokens) exceeds model.max_len {max_len} encoder positions: "
                             "shorten it")
        if max_new_tokens > max_len:
            raise ValueError(f"max_new_tokens {max_new_tokens} exceeds model.max_len {max_len} decoder positions: "
                             f"lower it to {max_len}")
        return
    if prompt_len + max_new_tokens > max_len:
        raise ValueError(
            f"the prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
            f"exceeds model.max_len {max_len}: "
            + (f"lower max_new_tokens to {max_len - prompt_len} or shorten the prompt" if prompt_len < max_len
               else f"shorten the prompt to at most {max_len - 1} tokens"))


def sample_logits(logits: jax.Array, rng, *, temperature: float = 0.0, top_k: int = 0) -> jax.Array:
    """logits [batch, vocab] -> token ids [batch]. temperature 0 = greedy."""
    if temperature == 0.0:
        return first_argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def describe_sampling(temperature: float, top_k: int, seed: int) -> str:
    """The settings a sample was drawn with, as printed beside it."""
    if temperature == 0.0:
        return "greedy"
    return f"sampled: temperature {temperature:g}, top_k {top_k or 'off'}, seed {seed}"


class Decoder:
    """Jitted prefill / step / loop for one split model. Build once, call many times.

    The jitted functions (`init_cache`, `prefill`, `step`, `loop`) take the parameters explicitly
    (benchmarks time them); `generate` and `sample` use the parameters the Decoder holds."""

    def __init__(self, graphdef, params, *, max_len: int, temperature: float = 0.0, top_k: int = 0,
                 dtype=None, mesh=None, cpu_kernels: bool | None = None):
        """cpu_kernels: use the compiled CPU decode kernels (docs/kernels.md). None (default): when they
        are loaded, JAX's default backend is the CPU and the parameters are not sharded (mesh None or
        of one device);
        True: require them (ValueError naming why they cannot be used); False: the pure-JAX path."""
        self.cpu_kernels = self._choose_kernels(cpu_kernels, mesh)
        self.graphdef = graphdef
        self.params = params if dtype is None else cast_floating(params, dtype)
        self.max_len = max_len
        self.mesh = mesh
        self.sample_fn = functools.partial(sample_logits, temperature=temperature, top_k=top_k)
        tokens_out = {} if mesh is None else {"out_shardings": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
        self.init_cache = jax.jit(self._init_cache, static_argnums=(1, 2))
        self.prefill = jax.jit(self._traced(self._prefill), donate_argnums=(2,))
        self.step = jax.jit(self._traced(self._step), donate_argnums=(1,))
        self.loop = jax.jit(self._traced(self._loop), static_argnums=(5,), donate_argnums=(1,))
        self._generate = jax.jit(self._traced(self._generate_tokens), static_argnums=(2, 3), **tokens_out)
        # A decoder-only LM prefills the prompt into the decoder; an encoder-decoder encodes it.
        self.prompt_in_decoder = bool(getattr(self._model(self.params), "prompt_in_decoder", True))

    @staticmethod
    def _choose_kernels(requested: bool | None, mesh) -> bool:
        if requested is False:
            return False
        why_not = (None if jax.default_backend() == "cpu" else f"JAX's default backend is {jax.default_backend()}")
        # A mesh of one device (the command line's default) holds whole parameters: the kernels take them.
        why_not = why_not or (None if mesh is None or mesh.size == 1 else "the parameters are sharded over a mesh")
        why_not = why_not or (None if cpu_kernels.available() else cpu_kernels.status()["reason"])
        if requested and why_not:
            raise ValueError(f"cpu_kernels=True, but the CPU decode kernels cannot be used: {why_not}")
        return why_not is None

    def _model(self, params):
        return nnx.merge(self.graphdef, params)

    def _traced(self, fn):
        """fn traced with the CPU kernels switched on or off for this Decoder (layers read the switch
        when they are traced, docs/kernels.md)."""
        @functools.wraps(fn)
        def traced(*args):
            with cpu_kernels.use_kernels(self.cpu_kernels):
                return fn(*args)
        return traced

    def _init_cache(self, params, batch, cache_len):
        return self._model(params).init_cache(batch, cache_len)

    def _prefill(self, params, prompt, cache, rng):
        """prompt [batch, P] -> (first sampled token [batch], cache)."""
        logits, cache = self._model(params).decode(prompt, cache, 0)
        return self.sample_fn(logits[:, -1], rng), cache

    def _step(self, params, cache, token, index, rng):
        """One token at absolute position `index` -> (next token, cache)."""
        logits, cache = self._model(params).decode(token[:, None], cache, index)
        return self.sample_fn(logits[:, -1], rng), cache

    def _loop(self, params, cache, token, index, rng, num_tokens: int):
        """Feeds `token` at `index`, then its successors: returns ([batch, num_tokens], cache)."""
        model = self._model(params)
        batch = token.shape[0]

        def body(i, carry):
            token, cache, out = carry
            logits, cache = model.decode(token[:, None], cache, index + i)
            token = self.sample_fn(logits[:, -1], jax.random.fold_in(rng, i))
            return token, cache, out.at[:, i].set(token)

        out = jnp.zeros((batch, num_tokens), jnp.int32)
        _, cache, out = jax.lax.fori_loop(0, num_tokens, body, (token, cache, out))
        return out, cache

    def _generate_tokens(self, params, prompt, max_new_tokens: int, cache_len: int, rng):
        """Prefill then the loop, as one program -> [batch, max_new_tokens]. The model's `prefill`
        says where the loop continues (after the prompt, or after an encoder-decoder's start token)."""
        prefill_rng, rng = jax.random.split(rng)
        logits, cache, index = self._model(params).prefill(prompt, cache_len)
        first = self.sample_fn(logits, prefill_rng)
        if max_new_tokens == 1:
            return first[:, None]
        rest, _ = self._loop(params, cache, first, index, rng, max_new_tokens - 1)
        return jnp.concatenate([first[:, None], rest], axis=1)

    def generate(self, prompt, max_new_tokens: int, *, seed: int = 0) -> np.ndarray:
        """prompt [batch, P] int -> [batch, max_new_tokens] generated ids (one jitted program)."""
        prompt = np.asarray(prompt, np.int32)
        if prompt.ndim != 2:
            raise ValueError(f"the prompt must be [batch, length] token ids, got shape {prompt.shape}")
        check_request(prompt.shape[1], max_new_tokens, self.max_len, prompt_in_decoder=self.prompt_in_decoder)
        if self.mesh is not None:  # every process holds the same prompt: one replicated global array
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            prompt = jax.make_array_from_process_local_data(replicated, prompt, prompt.shape)
        total = prompt.shape[1] + max_new_tokens if self.prompt_in_decoder else max_new_tokens
        out = self._generate(self.params, prompt, max_new_tokens, total, jax.random.PRNGKey(seed))
        return np.asarray(out)

    def sample(self, prompt_ids, max_new_tokens: int, *, seed: int = 0, eos_id: int | None = None) -> list[int]:
        """Continues one prompt (a list of ids) -> generated ids, cut before the first EOS if given."""
        out = self.generate(np.asarray([[int(i) for i in prompt_ids]], np.int32).reshape(1, -1), max_new_tokens,
                            seed=seed)[0].tolist()
        if eos_id is not None and eos_id in out:
            out = out[:out.index(eos_id)]
        return out


def generate(model: nnx.Module, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0, dtype=None) -> np.ndarray:
    """A module and a prompt [batch, P] -> [batch, max_new_tokens] (tests and notebooks; the command
    line and the training loop hold the split model in a Decoder)."""
    graphdef, params = nnx.split(model, nnx.Param)
    decoder = Decoder(graphdef, params.to_pure_dict(), max_len=model.max_len, temperature=temperature, top_k=top_k,
                      dtype=dtype)
    return decoder.generate(prompt, max_new_tokens, seed=seed)
