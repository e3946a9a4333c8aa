"""Unbatched per-token decode latency of dense vs sparse presets (the paper's decode benchmark).

For each preset: random weights (latency needs no training) built directly in the decode dtype,
batch 1, a 16-token prompt (prefill), then T tokens decoded greedily inside one jitted loop with
the caches (scaling_sparse.decode.Decoder.loop), timed over several repeats after compilation and
warm-up; and the same tokens again with one Python call per token (Decoder.step), which is what an
interactive user sees. Every figure is read against the memory bandwidth measured in the same run
(unbatched decoding is memory-bound: the floor per token is weight bytes read / bandwidth).

  python benchmarks/decode_latency.py                      # medium presets, ~10 min on 2 CPU cores
  python benchmarks/decode_latency.py --quick --presets=medium_dense,medium_sparse_all
  python benchmarks/decode_latency.py --presets=large_dense,large_sparse --large_layers=2

Writes benchmarks/results/decode_{cpu,gpu}.json and .png and prints a table.
CPU runs in float32, GPU runs in bfloat16 (--dtype overrides).
"""

from __future__ import annotations

import argparse
import gc
import json
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
from flax import nnx  # noqa: E402

from benchmarks import machine  # noqa: E402
from scaling_sparse.config import ConfigError, load_config, validate  # noqa: E402
from scaling_sparse.decode import Decoder  # noqa: E402
from scaling_sparse.model import DecoderLM  # noqa: E402
from scaling_sparse.params import report_params  # noqa: E402

DEFAULT_PRESETS = ("medium_dense", "medium_sparse_ff", "medium_sparse_qkv", "medium_sparse_ffqkv",
                   "medium_sparse_all", "terraformer_medium")
# Share of device memory the weights may take when deciding how many 17B-width layers fit.
MEMORY_HEADROOM = 0.85
CPU_LARGE_LAYERS = 2  # the reference timed a slice of the 17B model too (1 encoder + 2 decoder layers)
# Depth of the full 17B-class decoder: 15 blocks of 1.09B (d 9216, d_ff 40960) + 0.6B embedding and output
# = 17B parameters, 34 GB in bfloat16. The large_* presets themselves hold a 2-layer slice.
LARGE_FULL_LAYERS = 15


# --------------------------------------------------------------------------------------------
# Arithmetic (tested in tests/test_benchmark.py)

def bytes_per_token(params_per_token: int, dtype) -> int:
    """Weight bytes read to decode one token: every parameter used is read once, in `dtype`."""
    return int(params_per_token) * jnp.dtype(dtype).itemsize


def implied_gb_per_s(nbytes: float, ms_per_token: float) -> float:
    """The bandwidth (1e9 bytes/s) a decode step achieves if it reads `nbytes` per token."""
    return nbytes / (ms_per_token * 1e-3) / 1e9


def bandwidth_fraction(nbytes: float, ms_per_token: float, bandwidth_gb_per_s: float) -> float:
    """Implied GB/s over the measured memory bandwidth: 1.0 = at the memory floor."""
    return implied_gb_per_s(nbytes, ms_per_token) / bandwidth_gb_per_s


def speedup(dense_ms: float, ms: float) -> float:
    return dense_ms / ms


def size_group(preset: str) -> str:
    """medium_sparse_ff -> medium, large_dense -> large, terraformer_medium -> medium, tiny -> tiny."""
    parts = pathlib.Path(preset).stem.split("_")
    if parts[0] == "terraformer" and len(parts) > 1:
        return parts[1]
    return parts[0]


def is_dense(model_cfg) -> bool:
    """The baseline of a size group: no sparse layer and the standard (non-reversible) stack."""
    m = model_cfg
    return not (m.ff_sparsity or m.attn_sparsity or m.loss_sparsity or m.loss_lowrank or m.reversible
                or m.attention != "full" or m.ff_sru_units)


def add_speedups(results: list[dict]) -> list[dict]:
    """Fills speedup_vs_dense (in-loop and per-call) against the dense result of the same size group
    and layer count; None where the run has no such baseline."""
    for r in results:
        base = next((b for b in results if b["dense"] and b["size_group"] == r["size_group"]
                     and b["n_layers"] == r["n_layers"]), None)
        r["dense_baseline"] = base["preset"] if base else None
        r["speedup_vs_dense"] = speedup(base["ms_per_token"], r["ms_per_token"]) if base else None
        r["per_call_speedup_vs_dense"] = (speedup(base["per_call_ms_per_token"], r["per_call_ms_per_token"])
                                          if base and r.get("per_call_ms_per_token") else None)
        r["byte_ratio_vs_dense"] = base["bytes_per_token"] / r["bytes_per_token"] if base else None
    return results


def param_report(config) -> dict:
    """params_per_token and total_params of a config, without allocating the weights."""
    r = report_params(config)
    return {"params_per_token": int(r["params_per_token"]), "total_params": int(r["total_params"])}


# --------------------------------------------------------------------------------------------
# Model set-up

def with_overrides(config, *, dtype: str, n_layers: int | None = None):
    """Weights stored in the decode dtype (the decode layout: nothing is cast per token)."""
    config = config.copy_and_resolve_references()
    config.model.dtype = dtype
    config.model.param_dtype = dtype
    config.model.dropout = 0.0
    config.model.attn_dropout = 0.0
    if n_layers:
        config.model.n_layers = n_layers
    return validate(config)


def large_layers_plan(config, requested: int | None, *, backend: str, capacity_bytes: int,
                      dtype: str, full: int = LARGE_FULL_LAYERS) -> tuple[int, str]:
    """How many blocks of a 17B-width preset to time, and why.

    requested > 0: that many. CPU: a slice of CPU_LARGE_LAYERS (the full model does not fit host
    memory in float32, and the reference timed a slice too). GPU: the full decoder when its weights
    fit MEMORY_HEADROOM of device memory, else as many blocks as fit.
    """
    if requested:
        return min(requested, full), f"{min(requested, full)} of {full} layers (--large_layers)"
    if backend == "cpu" or not capacity_bytes:
        n = min(CPU_LARGE_LAYERS, full)
        return n, f"{n} of {full} layers (slice: the full model does not fit host memory)"
    itemsize = jnp.dtype(dtype).itemsize
    one = param_report(with_overrides(config, dtype=dtype, n_layers=1))["total_params"]
    two = param_report(with_overrides(config, dtype=dtype, n_layers=2))["total_params"]
    per_layer, rest = two - one, 2 * one - two
    fits = int((MEMORY_HEADROOM * capacity_bytes / itemsize - rest) // per_layer)
    if fits >= full:
        return full, f"all {full} layers"
    n = max(fits, 1)
    return n, f"{n} of {full} layers (slice: {full} do not fit {capacity_bytes / 2**30:.0f} GiB)"


def build(model_cfg, seed: int = 0, init: str = "model"):
    """(graphdef, state) of a randomly initialised model.

    init="model": the layers' own initialisers in one jitted call, so each array is drawn directly in
    its dtype on the default device (no float32 host copy: 17B in bfloat16 fits an 80 GB GPU).
    init="fast": every weight uniform in +-sqrt(3 / fan_in) from numpy, one array at a time, LayerNorm
    scales one. Timing does not depend on the values (the sparse layers' choices are data-dependent but
    cost the same), and XLA's CPU random-number generation is several times slower than numpy's
    (about 40 s for an 800M model on 2 cores), which would dominate a CPU run.
    """
    abstract = nnx.eval_shape(lambda: DecoderLM(model_cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    if init == "model":
        state = jax.jit(lambda: nnx.state(DecoderLM(model_cfg, rngs=nnx.Rngs(seed))))()
    elif init == "fast":
        state = _fast_state(abstract_state, seed)
    else:
        raise ValueError(f"init must be 'model' or 'fast', got {init!r}")
    return graphdef, jax.block_until_ready(state)


def _fast_state(abstract_state, seed: int):
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        dtype = jnp.dtype(leaf.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            return jnp.zeros(leaf.shape, dtype)
        if len(leaf.shape) < 2:  # LayerNorm gains one, biases zero
            return (jnp.ones if path[-1] == "scale" else jnp.zeros)(leaf.shape, dtype)
        fan_in = leaf.shape[-2]
        limit = np.float32(np.sqrt(3.0 / fan_in))
        host = rng.random(leaf.shape, dtype=np.float32)
        host *= 2 * limit
        host -= limit
        out = jnp.asarray(host, dtype)
        del host
        return out

    def names(path):  # [..., "final_norm", "scale"] without the Variable's trailing "value"
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        return [k for k in keys if k != "value"]

    return jax.tree_util.tree_map_with_path(lambda p, x: fill(names(p), x), abstract_state)


# --------------------------------------------------------------------------------------------
# Timing

def _seconds(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


class DecodeTimer:
    """Prefill, in-loop and per-call timings of one model (milliseconds). Compiles on construction;
    each *_once call adds one timed repeat, so main() can interleave the repeats of several presets."""

    def __init__(self, graphdef, state, *, vocab_size: int, prompt_len: int, tokens: int, per_call_tokens: int,
                 seed: int = 0):
        self.decoder, self.state = Decoder(graphdef), state
        self.prompt_len, self.tokens, self.per_call_tokens = prompt_len, tokens, per_call_tokens
        self.rng = jax.random.PRNGKey(seed)
        self.prompt = jax.random.randint(jax.random.PRNGKey(seed + 1), (1, prompt_len), 0, vocab_size, jnp.int32)
        self.cache_len = prompt_len + max(tokens, per_call_tokens)
        self.prefill, self.loop, self.per_call = [], [], []
        # Compile everything and warm up once (not timed).
        _, compile_prefill = self._prefill_timed()
        first, cache = self._prefilled()
        (out, cache), compile_loop = _seconds(
            lambda: self.decoder.loop(state, cache, first, prompt_len, self.rng, tokens))
        del cache
        first, cache = self._prefilled()
        _, cache = self.decoder.step(state, cache, first, prompt_len, self.rng)
        del cache
        self.loop_once(record=False)
        self.compile_s = {"prefill": compile_prefill, "loop": compile_loop}

    def _prefill_timed(self):
        cache = jax.block_until_ready(self.decoder.init_cache(self.state, 1, self.cache_len))
        return _seconds(lambda: self.decoder.prefill(self.state, self.prompt, cache, self.rng))

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
        (out, cache), dt = _seconds(lambda: self.decoder.loop(self.state, cache, first, self.prompt_len, self.rng,
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
            token, cache = self.decoder.step(self.state, cache, token, self.prompt_len + i, self.rng)
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
    config = load_config(name)
    full_layers = config.model.n_layers
    n_layers, layers_note = None, f"all {full_layers} layers"
    if size_group(name) == "large":
        full_layers = max(LARGE_FULL_LAYERS, full_layers)
        n_layers, layers_note = large_layers_plan(config, args.large_layers, backend=backend,
                                                  capacity_bytes=capacity_bytes, dtype=args.dtype,
                                                  full=full_layers)
    config = with_overrides(config, dtype=args.dtype, n_layers=n_layers)
    m = config.model
    counts = param_report(config)
    if args.prompt_len + max(args.tokens, args.per_call_tokens) > m.max_len:
        raise SystemExit(f"--prompt_len + --tokens exceed {name}'s model.max_len {m.max_len}: ask for fewer")
    start = time.perf_counter()
    graphdef, state = build(m, seed=args.seed, init=args.init)
    init_s = time.perf_counter() - start
    timer = DecodeTimer(graphdef, state, vocab_size=m.vocab_size, prompt_len=args.prompt_len, tokens=args.tokens,
                        per_call_tokens=args.per_call_tokens, seed=args.seed)
    cache_bytes = 2 * m.n_layers * (args.prompt_len + max(args.tokens, args.per_call_tokens)) * m.d_model
    meta = {
        "preset": name,
        "size_group": size_group(name),
        "dense": is_dense(m),
        "n_layers": m.n_layers,
        "full_n_layers": full_layers,
        "layers_note": layers_note,
        "dtype": args.dtype,
        "d_model": m.d_model, "d_ff": m.d_ff, "ff_sparsity": m.ff_sparsity, "attn_sparsity": m.attn_sparsity,
        "loss_sparsity": m.loss_sparsity, "reversible": bool(m.reversible),
        "params_per_token": counts["params_per_token"],
        "total_params": counts["total_params"],
        "bytes_per_token": bytes_per_token(counts["params_per_token"], args.dtype),
        # The attention also reads its whole (masked) KV cache per token: not weights, listed apart.
        "kv_cache_bytes_per_token": cache_bytes * jnp.dtype(args.dtype).itemsize,
        "init_s": init_s,
    }
    return meta, timer


def finish_preset(meta: dict, timer: DecodeTimer, bandwidth_gb_per_s: float) -> dict:
    timing = timer.summary()
    ms, nbytes = timing["ms_per_token"], meta["bytes_per_token"]
    return {**meta,
            "implied_gb_per_s": implied_gb_per_s(nbytes, ms),
            "bandwidth_fraction": bandwidth_fraction(nbytes, ms, bandwidth_gb_per_s),
            "floor_ms_per_token": nbytes / (bandwidth_gb_per_s * 1e9) * 1e3,
            **timing}


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
    total = sum(param_report(with_overrides(load_config(n), dtype=args.dtype,
                                            n_layers=CPU_LARGE_LAYERS if size_group(n) == "large" else None))
                ["total_params"] for n in presets) * jnp.dtype(args.dtype).itemsize
    return size_group(presets[0]) != "large" and total <= 0.6 * capacity_bytes


# --------------------------------------------------------------------------------------------
# Output

def machine_kind(backend: str) -> str:
    return "cpu" if backend == "cpu" else "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def format_table(results: list[dict], bandwidth: dict) -> str:
    head = (f"{'preset':<22}{'layers':>7}{'dtype':>9}{'Mparam/tok':>11}{'MB/tok':>9}{'ms/tok':>9}"
            f"{'spread':>15}{'per-call':>10}{'prefill':>9}{'tok/s':>8}{'GB/s':>7}{'%BW':>6}{'speedup':>9}"
            f"{'bytes x':>9}")
    lines = [f"memory bandwidth (copy, measured in this run): {bandwidth['gb_per_s']:.1f} GB/s "
             f"(read-only {bandwidth['read_gb_per_s']:.1f} GB/s)", head, "-" * len(head)]
    for r in results:
        sp = "-" if r["speedup_vs_dense"] is None else f"{r['speedup_vs_dense']:.2f}x"
        br = "-" if r["byte_ratio_vs_dense"] is None else f"{r['byte_ratio_vs_dense']:.1f}x"
        layers = f"{r['n_layers']}/{r['full_n_layers']}" if r["n_layers"] != r["full_n_layers"] else str(r["n_layers"])
        lines.append(
            f"{r['preset']:<22}{layers:>7}{r['dtype']:>9}{r['params_per_token'] / 1e6:>11.1f}"
            f"{r['bytes_per_token'] / 1e6:>9.1f}{r['ms_per_token']:>9.2f}"
            f"{r['ms_per_token_min']:>7.2f}-{r['ms_per_token_max']:<7.2f}{r['per_call_ms_per_token']:>10.2f}"
            f"{r['prefill_ms']:>9.1f}{r['tokens_per_s']:>8.1f}{r['implied_gb_per_s']:>7.1f}"
            f"{100 * r['bandwidth_fraction']:>5.0f}%{sp:>9}{br:>9}")
    notes = [f"  {r['preset']}: timed {r['layers_note']}" for r in results if r["n_layers"] != r["full_n_layers"]]
    if notes:
        lines += ["sliced models (speedups compare slices of equal depth):"] + notes
    bad = [f"{r['preset']} ({100 * r['per_call_agreement']:.0f}% equal)" for r in results
           if not r["per_call_matches_loop"]]
    if bad:
        lines.append(f"note: per-call tokens differ from in-loop tokens for {', '.join(bad)}: random weights "
                     "give near-tied argmaxes that flip between two compilations")
    lines.append("ms/tok: median per token inside one jitted loop; spread: min-max over repeats; per-call: "
                 "one Python call per token; bytes x: dense weight bytes / this preset's (the memory-bound ideal)")
    return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["preset"] for r in results]
    x = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(names)), 4.8))
    ax1.bar(x - 0.2, [r["ms_per_token"] for r in results], 0.4, label="in jitted loop",
            yerr=[[r["ms_per_token"] - r["ms_per_token_min"] for r in results],
                  [r["ms_per_token_max"] - r["ms_per_token"] for r in results]])
    ax1.bar(x + 0.2, [r["per_call_ms_per_token"] for r in results], 0.4, label="one call per token")
    ax1.plot(x, [r["floor_ms_per_token"] for r in results], "k_", markersize=18, label="memory floor")
    ax1.set_ylabel("ms per token (batch 1)")
    ax1.set_yscale("log")
    ax1.set_title("latency per decoded token")
    ax2.bar(x - 0.2, [r["speedup_vs_dense"] or 0 for r in results], 0.4, label="in jitted loop")
    ax2.bar(x + 0.2, [r["per_call_speedup_vs_dense"] or 0 for r in results], 0.4, label="one call per token")
    ax2.plot(x, [r["byte_ratio_vs_dense"] or 0 for r in results], "k_", markersize=18,
             label="weight-byte ratio")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_ylabel("speedup vs dense of the same size")
    ax2.set_title("speedup vs dense")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels([f"{n}\n({r['n_layers']} layers)" for n, r in zip(names, results)],
                           rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    p.add_argument("--init", choices=("model", "fast"), default=None,
                   help="weights: the layers' own initialisers in one jitted call (model; default on GPU), or "
                        "numpy uniform values (fast; default on CPU, where XLA's random numbers are slow)")
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
    args.init = args.init or ("fast" if backend == "cpu" else "model")
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

    def report(r):
        print(f"  {r['preset']}: {r['ms_per_token']:.2f} ms/token in loop, {r['per_call_ms_per_token']:.2f} ms/token "
              f"per call, prefill {r['prefill_ms']:.1f} ms, {100 * r['bandwidth_fraction']:.0f}% of bandwidth "
              f"(init {r['init_s']:.1f} s, compile {r['compile_s']['loop']:.1f} s)", flush=True)

    results, prepared = [], []
    for name in presets:
        print(f"preparing {name} ...", flush=True)
        meta, timer = prepare_preset(name, args, backend=backend, capacity_bytes=capacity)
        if interleave:
            prepared.append((meta, timer))
            continue
        run_timers([timer], args)
        results.append(finish_preset(meta, timer, bandwidth["gb_per_s"]))
        report(results[-1])
        del timer
        gc.collect()
    if interleave:
        print(f"timing {len(prepared)} presets, {args.repeats} interleaved repeats ...", flush=True)
        run_timers([timer for _, timer in prepared], args)
        for meta, timer in prepared:
            results.append(finish_preset(meta, timer, bandwidth["gb_per_s"]))
            report(results[-1])
    add_speedups(results)

    print(format_table(results, bandwidth))
    kind = machine_kind(backend)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "unbatched greedy decode latency",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": info,
        "bandwidth": bandwidth,
        "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "schedule": "interleaved" if interleave else "sequential",
        "results": results,
    }
    json_path = out_dir / f"decode_{kind}.json"
    json_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {json_path}")
    if not args.no_plot:
        png = out_dir / f"decode_{kind}.png"
        plot(results, png, f"{', '.join(info['devices'])}, {args.dtype}, batch 1, "
                           f"{args.tokens} tokens after a {args.prompt_len}-token prompt")
        print(f"wrote {png}")
    return report


if __name__ == "__main__":
    main()
