"""Timing one compiled decoder (benchmarks/decode_latency.py): prefill, T tokens inside one jitted
loop, and one Python call per token, each timed repeat added on demand so that several models'
repeats can be interleaved (`run_timers`). Method: docs/benchmarks.md."""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling_sparse.kernels import cpu as cpu_kernels


def _seconds(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


class DecodeTimer:
    """Prefill, in-loop and per-call timings of one model (milliseconds). Compiles on construction;
    each *_once call adds one timed repeat, so main() can interleave the repeats of several presets."""

    def __init__(self, decoder, *, vocab_size: int, prompt_len: int, tokens: int, per_call_tokens: int,
                 seed: int = 0):
        self.decoder = decoder
        self.params = params = decoder.params
        self.prompt_len, self.tokens, self.per_call_tokens = prompt_len, tokens, per_call_tokens
        self.rng = jax.random.PRNGKey(seed)
        self._setup(vocab_size, seed)
        self.prefill, self.loop, self.per_call = [], [], []
        # Compile everything and warm up once (not timed).
        _, compile_prefill = self._prefill_timed()
        first, loop_cache = self._prefilled()
        _, compile_loop = _seconds(lambda: self.decoder.loop(params, loop_cache, first, self.start_index, self.rng,
                                                             tokens))
        first, step_cache = self._prefilled()
        # The kernels the compiled step really calls (none for a dense model, or off the CPU).
        self.kernel_targets = cpu_kernels.targets_in(
            self.decoder.step.lower(params, step_cache, first, self.start_index, self.rng).as_text())
        self.decoder.step(params, step_cache, first, self.start_index, self.rng)  # compiles the per-call step
        self.loop_once(record=False)
        self.compile_s = {"prefill": compile_prefill, "loop": compile_loop}

    def _setup(self, vocab_size: int, seed: int) -> None:
        """The prompt, the position the first sampled token is fed at, and the cache length."""
        prompt_len = self.prompt_len
        self.prompt = jax.random.randint(jax.random.PRNGKey(seed + 1), (1, prompt_len), 0, vocab_size, jnp.int32)
        self.start_index = prompt_len
        self.cache_len = prompt_len + max(self.tokens, self.per_call_tokens)

    def _prefill_timed(self):
        cache = jax.block_until_ready(self.decoder.init_cache(self.params, 1, self.cache_len))
        return _seconds(lambda: self.decoder.prefill(self.params, self.prompt, cache, self.rng))

    def _prefilled(self):
        """(first token, a fresh cache holding the prompt). Every timed run starts from one: the
        convolution and SRU caches are running states (not indexed by position), so a used cache
        cannot be rewound."""
        return self._prefill_timed()[0]

    def prefill_once(self) -> None:
        _, dt = self._prefill_timed()
        self.prefill.append(dt * 1e3)

    def loop_once(self, record: bool = True) -> None:
        """T tokens in one jitted fori_loop, from a freshly prefilled cache."""
        first, cache = self._prefilled()
        (out, cache), dt = _seconds(lambda: self.decoder.loop(self.params, cache, first, self.start_index, self.rng,
                                                              self.tokens))
        self.loop_tokens = np.asarray(out)[0]
        if record:
            self.loop.append(dt * 1e3 / self.tokens)

    def per_call_once(self) -> None:
        """One Python call per token and the token fetched to the host, as a user's loop does."""
        token, cache = self._prefilled()
        self.per_call_out = []
        for i in range(self.per_call_tokens):
            start = time.perf_counter()
            token, cache = self.decoder.step(self.params, cache, token, self.start_index + i, self.rng)
            self.per_call_out.append(int(np.asarray(token)[0]))
            self.per_call.append((time.perf_counter() - start) * 1e3)

    def summary(self) -> dict:
        loop, prefill, per_call = self.loop, self.prefill, self.per_call
        n_check = min(self.tokens, self.per_call_tokens)
        same = np.asarray(self.loop_tokens[:n_check]) == np.asarray(self.per_call_out[:n_check])
        return {
            "ms_per_token": statistics.median(loop),
            "ms_per_token_min": min(loop),
            "ms_per_token_max": max(loop),
            "ms_per_token_stdev": statistics.stdev(loop) if len(loop) > 1 else 0.0,
            "ms_per_token_repeats": loop,
            "tokens_per_s": 1e3 / statistics.median(loop),
            "prefill_ms": statistics.median(prefill),
            "prefill_ms_min": min(prefill),
            "per_call_ms_per_token": statistics.median(per_call),
            "per_call_ms_p10": float(np.percentile(per_call, 10)),
            "per_call_ms_p90": float(np.percentile(per_call, 90)),
            "per_call_tokens_per_s": 1e3 / statistics.median(per_call),
            # Greedy decoding is deterministic, so both modes should produce the same tokens (up to a
            # near-tied argmax flipping between two compilations).
            "per_call_matches_loop": bool(same.all()),
            "per_call_agreement": float(same.mean()),
            "compile_s": self.compile_s,
        }


class EncDecTimer(DecodeTimer):
    """DecodeTimer for an encoder-decoder (`prompt_in_decoder` False: encdec.py, terraformer_encdec.py).

    The prompt is the encoder input; "prefill" is the model's own `prefill(prompt, cache_len)`, jitted:
    cache allocation, the encoder once, the cross K/V (or the Terraformer's encoder prefix) once, and
    the start token 0 at decoder position 0, then the first token sampled. The in-loop and per-call
    runs continue from the index prefill returns (1), with the same `Decoder.loop` / `Decoder.step`
    as the decoder-only rows; `cache_len` counts decoder positions."""

    def _setup(self, vocab_size: int, seed: int) -> None:
        decoder = self.decoder
        # Ids 1..V-1: 0 is the encoder's padding (masked out; the Terraformer's prompt must be unpadded).
        self.prompt = jax.random.randint(jax.random.PRNGKey(seed + 1), (1, self.prompt_len), 1, vocab_size,
                                         jnp.int32)
        traced = {}

        def prefill(params, prompt, rng, cache_len):
            logits, cache, index = nnx.merge(decoder.graphdef, params).prefill(prompt, cache_len)
            traced["index"] = int(index)  # a Python int: where decoding continues
            return decoder.sample_fn(logits, rng), cache

        jax.eval_shape(functools.partial(prefill, cache_len=decoder.max_len), self.params, self.prompt, self.rng)
        self.start_index = traced["index"]
        self.cache_len = self.start_index + max(self.tokens, self.per_call_tokens)
        if self.cache_len > decoder.max_len:
            raise SystemExit(f"{self.cache_len} decoder positions exceed model.max_len {decoder.max_len}: ask for "
                             "fewer --tokens / --per_call_tokens")
        self._prefill_fn = jax.jit(functools.partial(prefill, cache_len=self.cache_len))

    def _prefill_timed(self):
        return _seconds(lambda: self._prefill_fn(self.params, self.prompt, self.rng))


def make_timer(decoder, config, args) -> DecodeTimer:
    """The compiled timer of one decoder (an encoder-decoder's or a decoder-only LM's)."""
    m = config.model
    timer = (EncDecTimer if m.arch == "encdec" else DecodeTimer)(
        decoder, vocab_size=m.vocab_size, prompt_len=args.prompt_len, tokens=args.tokens,
        per_call_tokens=args.per_call_tokens, seed=args.seed)
    timer.config = config
    return timer


def run_timers(timers: list[DecodeTimer], args) -> None:
    """The timed repeats, round-robin over the timers: a slow spell of a shared machine then slows
    every preset's repeat alike instead of one preset's whole measurement."""
    for _ in range(args.repeats):
        for timer in timers:
            timer.loop_once()
            timer.prefill_once()
    for _ in range(args.per_call_repeats):
        for timer in timers:
            timer.per_call_once()


