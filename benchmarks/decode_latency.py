"""Unbatched per-token decode latency of dense vs sparse presets (the paper's decode benchmark).

For each preset: random weights (latency needs no training) from the state builder, built directly
in the decode dtype (set-up: benchmarks/models.py), batch 1, a 16-token prompt (prefill), then T
tokens decoded greedily inside one jitted loop with the caches (scaling_sparse.decode.Decoder.loop),
timed over several repeats after compilation and warm-up; and the same tokens again with one Python
call per token (Decoder.step), which is what an interactive user sees. Every figure is read against
the memory bandwidth measured in the same run (unbatched decoding is memory-bound: the floor per
token is weight bytes read / bandwidth).

  python benchmarks/decode_latency.py                      # medium presets, ~10 min on 2 CPU cores
  python benchmarks/decode_latency.py --quick --presets=medium_dense,medium_sparse_all
  python benchmarks/decode_latency.py --presets=large_dense,large_sparse --large_layers=2

Writes benchmarks/results/decode_{cpu,gpu}.json and .png and prints a table (benchmarks/reporting.py).
CPU runs in float32, GPU runs in bfloat16 (--dtype overrides). Method: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and the checkout importable
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import machine, models, reporting  # noqa: E402
from scaling_sparse.config import ConfigError, load_config  # noqa: E402

DEFAULT_PRESETS = ("medium_dense", "medium_sparse_ff", "medium_sparse_qkv", "medium_sparse_ffqkv",
                   "medium_sparse_all", "terraformer_medium")


# --------------------------------------------------------------------------------------------
# Timing

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
        self.prompt = jax.random.randint(jax.random.PRNGKey(seed + 1), (1, prompt_len), 0, vocab_size, jnp.int32)
        self.cache_len = prompt_len + max(tokens, per_call_tokens)
        self.prefill, self.loop, self.per_call = [], [], []
        # Compile everything and warm up once (not timed).
        _, compile_prefill = self._prefill_timed()
        first, loop_cache = self._prefilled()
        _, compile_loop = _seconds(lambda: self.decoder.loop(params, loop_cache, first, prompt_len, self.rng, tokens))
        first, step_cache = self._prefilled()
        self.decoder.step(params, step_cache, first, prompt_len, self.rng)  # compiles the per-call step
        self.loop_once(record=False)
        self.compile_s = {"prefill": compile_prefill, "loop": compile_loop}

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
        (out, cache), dt = _seconds(lambda: self.decoder.loop(self.params, cache, first, self.prompt_len, self.rng,
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
            token, cache = self.decoder.step(self.params, cache, token, self.prompt_len + i, self.rng)
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


def prepare_preset(name: str, args, *, backend: str, capacity_bytes: int) -> tuple[dict, DecodeTimer]:
    """(what the result reports about the preset, its compiled timer)."""
    config, full_layers, layers_note = models.benchmark_config(
        name, dtype=args.dtype, large_layers=args.large_layers, backend=backend, capacity_bytes=capacity_bytes)
    m = config.model
    counts = models.param_report(config)
    if args.prompt_len + max(args.tokens, args.per_call_tokens) > m.max_len:
        raise SystemExit(f"--prompt_len + --tokens exceed {name}'s model.max_len {m.max_len}: ask for fewer")
    decoder, init_s = models.build_decoder(config, seed=args.seed)
    timer = DecodeTimer(decoder, vocab_size=m.vocab_size, prompt_len=args.prompt_len, tokens=args.tokens,
                        per_call_tokens=args.per_call_tokens, seed=args.seed)
    cache_bytes = 2 * m.n_layers * (args.prompt_len + max(args.tokens, args.per_call_tokens)) * m.d_model
    meta = {
        "preset": name,
        "size_group": models.size_group(name),
        "dense": models.is_dense(m),
        "n_layers": m.n_layers,
        "full_n_layers": full_layers,
        "layers_note": layers_note,
        "dtype": args.dtype,
        "d_model": m.d_model, "d_ff": m.d_ff, "ff_sparsity": m.ff_sparsity, "attn_sparsity": m.attn_sparsity,
        "loss_sparsity": m.loss_sparsity, "reversible": bool(m.reversible),
        "params_per_token": counts["params_per_token"],
        "total_params": counts["total_params"],
        "bytes_per_token": reporting.bytes_per_token(counts["params_per_token"], args.dtype),
        # The attention also reads its whole (masked) KV cache per token: not weights, listed apart.
        "kv_cache_bytes_per_token": cache_bytes * jnp.dtype(args.dtype).itemsize,
        "init_s": init_s,
    }
    return meta, timer


def finish_preset(meta: dict, timer: DecodeTimer, bandwidth_gb_per_s: float) -> dict:
    timing = timer.summary()
    return {**meta, **reporting.bandwidth_figures(meta["bytes_per_token"], timing["ms_per_token"],
                                                  bandwidth_gb_per_s), **timing}


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


def fits_together(presets: list[str], args, capacity_bytes: int) -> bool:
    """Whether every preset's weights fit memory at once (then their repeats are interleaved)."""
    total = sum(models.weight_bytes(n, args.dtype) for n in presets)
    return models.size_group(presets[0]) != "large" and total <= 0.6 * capacity_bytes


# --------------------------------------------------------------------------------------------
# Entry point

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="",
                   help="comma-separated preset names or config paths (default: the medium presets "
                        "and terraformer_medium)")
    p.add_argument("--tokens", type=int, default=None, help="tokens decoded per timed loop (default 64)")
    p.add_argument("--prompt_len", type=int, default=16, help="prompt length for the prefill")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of each loop (default 5)")
    p.add_argument("--per_call_tokens", type=int, default=None, help="tokens in the per-call mode (default 32)")
    p.add_argument("--per_call_repeats", type=int, default=1, help="passes over the per-call tokens")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights and compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--large_layers", type=int, default=None,
                   help="blocks to time of a large_* (17B-width) preset (default: 2 on CPU; on GPU all that fit)")
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no_plot", action="store_true", help="skip the matplotlib plot")
    p.add_argument("--quick", action="store_true",
                   help="a fast development run: 16 tokens, 2 repeats, 8 per-call tokens, small bandwidth probe")
    p.add_argument("--bandwidth_mb", type=int, default=None,
                   help="array size of the bandwidth probe in MiB (default 1024 on CPU, 4096 on GPU, 256 quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequential", action="store_true",
                   help="time one preset at a time even when all fit memory (default: interleave the repeats)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"tokens": (16, 64), "repeats": (2, 5), "per_call_tokens": (8, 32)}  # (quick, full)
    for name, (fast, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, fast if quick else full)
    for name in ("tokens", "prompt_len", "repeats", "per_call_tokens", "per_call_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.bandwidth_mb is not None and args.bandwidth_mb < 1:
        p.error(f"--bandwidth_mb must be >= 1, got {args.bandwidth_mb}")
    if args.large_layers is not None and args.large_layers < 1:
        p.error(f"--large_layers must be >= 1, got {args.large_layers}")
    return args


def resolve_presets(spec: str) -> list[str]:
    """The presets to time; an unknown one fails before any timing, naming the known ones."""
    names = [n.strip() for n in spec.split(",") if n.strip()] or list(DEFAULT_PRESETS)
    for n in names:
        load_config(n)
    return names


def main(argv=None) -> dict:
    args = parse_args(argv)
    backend = jax.default_backend()
    args.dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    try:
        presets = resolve_presets(args.presets)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    info = machine.machine_info()
    capacity = info.get("device_memory_bytes") or info["host_memory_bytes"]
    print(f"device: {', '.join(info['devices'])} | {info['cpu_count']} CPU cores | dtype {args.dtype} | "
          f"prompt {args.prompt_len}, {args.tokens} tokens x {args.repeats} repeats", flush=True)

    probe_mb = args.bandwidth_mb or (256 if args.quick else 1024 if backend == "cpu" else 4096)
    probe = probe_mb << 20
    bandwidth = machine.measure_bandwidth(probe, repeats=5 if args.quick else 10)
    print(f"memory bandwidth: {bandwidth['gb_per_s']:.1f} GB/s copy, {bandwidth['read_gb_per_s']:.1f} GB/s read",
          flush=True)

    interleave = fits_together(presets, args, capacity) and not args.sequential
    print(f"schedule: {'repeats interleaved across presets' if interleave else 'one preset at a time'}", flush=True)

    results, prepared = [], []
    for name in presets:
        print(f"preparing {name} ...", flush=True)
        meta, timer = prepare_preset(name, args, backend=backend, capacity_bytes=capacity)
        if interleave:
            prepared.append((meta, timer))
            continue
        run_timers([timer], args)
        results.append(finish_preset(meta, timer, bandwidth["gb_per_s"]))
        print(reporting.decode_line(results[-1]), flush=True)
        del timer
        gc.collect()
    if interleave:
        print(f"timing {len(prepared)} presets, {args.repeats} interleaved repeats ...", flush=True)
        run_timers([timer for _, timer in prepared], args)
        for meta, timer in prepared:
            results.append(finish_preset(meta, timer, bandwidth["gb_per_s"]))
            print(reporting.decode_line(results[-1]), flush=True)
    reporting.add_speedups(results)

    print(reporting.format_decode_table(results, bandwidth))
    kind = machine.machine_kind(backend)
    out_dir = pathlib.Path(args.out_dir)
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    report = {
        **reporting.run_header("unbatched greedy decode latency", info),
        "bandwidth": bandwidth,
        "settings": {**settings, "init": models.INIT},
        "schedule": "interleaved" if interleave else "sequential",
        "results": results,
    }
    reporting.write_json(out_dir / f"decode_{kind}.json", report)
    if not args.no_plot:
        reporting.plot_decode(results, out_dir / f"decode_{kind}.png",
                              f"{', '.join(info['devices'])}, {args.dtype}, batch 1, "
                              f"{args.tokens} tokens after a {args.prompt_len}-token prompt")
    return report


if __name__ == "__main__":
    main()
