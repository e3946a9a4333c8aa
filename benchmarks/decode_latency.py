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
import dataclasses
import functools
import gc
import os
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

from benchmarks import machine, models, reporting  # noqa: E402
from scaling_sparse.config import ConfigError, load_config  # noqa: E402
from scaling_sparse.decode import Decoder  # noqa: E402
from scaling_sparse.kernels import cpu as cpu_kernels  # noqa: E402

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


def prepare_preset(name: str, args, *, backend: str, capacity_bytes: int, config=None) -> tuple[dict, DecodeTimer]:
    """(what the result reports about the preset, its compiled timer). `config`: an already
    overridden config in the benchmark dtype (the paper rows), else the preset's (models.benchmark_config)."""
    if config is None:
        config, full_layers, layers_note = models.benchmark_config(
            name, dtype=args.dtype, large_layers=args.large_layers, backend=backend, capacity_bytes=capacity_bytes)
    else:
        full_layers, layers_note = config.model.n_layers, f"all {config.model.n_layers} layers"
    m = config.model
    encdec = m.arch == "encdec"
    counts = models.param_report(config)
    if encdec:
        if args.prompt_len > m.max_len or 1 + max(args.tokens, args.per_call_tokens) > m.max_len:
            raise SystemExit(f"--prompt_len or --tokens exceed {name}'s model.max_len {m.max_len}: ask for fewer")
    elif args.prompt_len + max(args.tokens, args.per_call_tokens) > m.max_len:
        raise SystemExit(f"--prompt_len + --tokens exceed {name}'s model.max_len {m.max_len}: ask for fewer")
    decoder, init_s = models.build_decoder(config, seed=args.seed,
                                           cpu_kernels=False if args.cpu_kernels == "off" else None)
    timer = make_timer(decoder, config, args)
    cache_bytes = 2 * m.n_layers * (args.prompt_len + max(args.tokens, args.per_call_tokens)) * m.d_model
    if encdec:  # self-attention K/V over the decoder positions + the prompt's cross K/V (or prefix), per layer
        cache_bytes = 2 * m.n_layers * (timer.cache_len + args.prompt_len) * m.d_model
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
        # Which decode path ran: the compiled CPU kernels for the sparse layers, or pure JAX.
        "decode_path": "cpu_kernels" if timer.kernel_targets else "jax",
        "cpu_kernel_targets": timer.kernel_targets,
        "params_per_token": counts["params_per_token"],
        "total_params": counts["total_params"],
        "bytes_per_token": reporting.bytes_per_token(counts["params_per_token"], args.dtype),
        # The attention also reads its whole (masked) KV cache per token: not weights, listed apart.
        "kv_cache_bytes_per_token": cache_bytes * jnp.dtype(args.dtype).itemsize,
        "init_s": init_s,
    }
    if models.init_mode(config) != "threefry":
        meta["init_prng"] = f"{models.init_mode(config)} (weights over models.RBG_INIT_BYTES)"
    if encdec:
        meta.update({"arch": "encdec", "n_encoder_layers": m.n_encoder_layers or m.n_layers,
                     "prompt": "encoder input", "decode_start_index": timer.start_index,
                     "decode_cache_len": timer.cache_len})
    return meta, timer


def make_timer(decoder, config, args) -> DecodeTimer:
    """The compiled timer of one decoder (an encoder-decoder's or a decoder-only LM's)."""
    m = config.model
    timer = (EncDecTimer if m.arch == "encdec" else DecodeTimer)(
        decoder, vocab_size=m.vocab_size, prompt_len=args.prompt_len, tokens=args.tokens,
        per_call_tokens=args.per_call_tokens, seed=args.seed)
    timer.config = config
    return timer


def jax_path_twin(name: str, meta: dict, timer: DecodeTimer, args) -> tuple[dict, DecodeTimer] | None:
    """--cpu_kernels=compare: the same weights decoded on the pure-JAX path, timed beside the kernel
    path in the same run (None where the preset did not use the kernels: dense, or none loaded)."""
    if meta["decode_path"] != "cpu_kernels":
        return None
    kernel_decoder = timer.decoder
    decoder = Decoder(kernel_decoder.graphdef, kernel_decoder.params, max_len=kernel_decoder.max_len,
                      cpu_kernels=False)
    print(f"preparing {name} on the pure-JAX path ...", flush=True)
    twin = make_timer(decoder, timer.config, args)
    return {**meta, "decode_path": "jax", "cpu_kernel_targets": twin.kernel_targets, "label": f"{name}@jax"}, twin


def finish_preset(meta: dict, timer: DecodeTimer, bandwidth: dict) -> dict:
    timing = timer.summary()
    return {**meta, **reporting.bandwidth_figures(meta["bytes_per_token"], timing["ms_per_token"], bandwidth),
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
    total = sum(models.weight_bytes(n, args.dtype) for n in presets)
    return models.size_group(presets[0]) != "large" and total <= 0.6 * capacity_bytes


# --------------------------------------------------------------------------------------------
# The paper rows (--paper_rows): the reference's encoder-decoders, pair by pair (docs/benchmarks.md)

@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One timed model: a preset (+ config overrides, dotted keys), the paper figure it compares with
    (`paper_s`: seconds, None where no figure is quoted) and the row its speedup is taken against."""
    preset: str
    paper_row: str
    paper_s: float | None = None
    baseline: str | None = None  # the label of this group's baseline row
    overrides: tuple = ()        # ((dotted config key, value), ...)

    @property
    def label(self) -> str:
        if not self.overrides:
            return self.preset
        fields = ",".join(f"{key.rpartition('.')[2]}={value}" for key, value in self.overrides)
        return f"{self.preset}[{fields}]"


@dataclasses.dataclass(frozen=True)
class PaperGroup:
    """Rows timed together. interleave: repeats round-robin when the weights fit together (else one
    at a time); tokens/repeats None = the command line's (--tokens, --repeats, --per_call_tokens)."""
    name: str
    title: str
    rows: tuple
    interleave: bool = True
    tokens: int | None = None
    repeats: int | None = None


DENSE_800M = "paper_medium_dense"
DENSE_17B = "paper_large_dense_slice"
PAPER_GROUPS = {
    # trax decoding_timing_test.py, template medium_transformer: the dense baseline and the
    # "Sparse FF+QKV" override (ff_sparsity 64, d_ff 6144, MultiplicativeConvCausalAttention S 16,
    # kernel 3), both with loss_sparsity 0; the presets as trained (sparse loss S 4) and the
    # Terraformer are timed beside them.
    "medium": PaperGroup("medium", "800M encoder-decoders (24 + 24 layers)", (
        PaperRow(DENSE_800M, "800M dense, Table 1: 0.160 s", 0.160),
        PaperRow("paper_medium_sparse_ffqkv", "800M Sparse FF+QKV (dense loss layer, as the reference timing "
                 "row), Table 1: 0.061 s", 0.061, DENSE_800M, (("model.loss_sparsity", 0),)),
        PaperRow("paper_medium_sparse_ffqkv", "800M Sparse FF+QKV + sparse loss (S 4, as trained); the "
                 "reference's 'Sparse FF+QKV + Loss' timing row is commented out: no paper figure", None, DENSE_800M),
        PaperRow("paper_terraformer_medium", "Terraformer medium (as trained); the reference's "
                 "medium_terraformer timing template is commented out: no paper figure", None, DENSE_800M),
    )),
    # Template big_transformer: 1 encoder + 2 decoder layers at d 9216, dense loss layer; the sweep's
    # "Sparse FF+QKV" entry: ff_sparsity (256, 32), S 64, d_ff 65536.
    "large": PaperGroup("large", "17B width, slice of 1 encoder + 2 decoder layers", (
        PaperRow(DENSE_17B, "17B dense (1 encoder + 2 decoder layers slice), Table 1: 3.690 s", 3.690),
        PaperRow("paper_large_sparse_slice", "17B Sparse FF+QKV (same slice), Table 1: 0.183 s", 0.183, DENSE_17B),
    ), interleave=False, tokens=10, repeats=3),
}
HEADROOM_BYTES = 3 << 30  # host memory left free beside one model's weights (one-at-a-time groups)
INTERLEAVE_SHARE = 0.6    # an interleaved group's weights may take this share of available memory


def paper_config(row: PaperRow, dtype: str):
    """A paper row's config: the preset, its overrides, the benchmark dtype (models.with_overrides)."""
    config = load_config(row.preset).copy_and_resolve_references()
    for key, value in row.overrides:
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        if last not in node:
            raise ConfigError(f"paper row {row.label}: unknown config field {key!r}")
        node[last] = value
    return models.with_overrides(config, dtype=dtype)


def config_bytes(config, dtype: str) -> int:
    return models.param_report(config)["total_params"] * jnp.dtype(dtype).itemsize


def plan_group(group: PaperGroup, dtype: str, available: int, *, dtype_forced: bool) -> dict:
    """How a group runs in this memory: interleaved or not, the dtype, or skipped; with the reasons.
    Weight sizes come from parameter counts (nothing allocated)."""
    sizes = {row.label: config_bytes(paper_config(row, dtype), dtype) for row in group.rows}
    plan = {"dtype": dtype, "dtype_note": "the benchmark dtype", "weight_bytes": sizes,
            "available_bytes": available}
    if group.interleave and sum(sizes.values()) <= INTERLEAVE_SHARE * available:
        plan.update(schedule="interleaved", schedule_note=f"all {len(sizes)} models' weights together "
                    f"({sum(sizes.values()) / 1e9:.1f} GB) fit {INTERLEAVE_SHARE:.0%} of available memory")
        return plan
    why = ("too large to hold two at once" if not group.interleave else
           f"{sum(sizes.values()) / 1e9:.1f} GB together exceed {INTERLEAVE_SHARE:.0%} of available memory")
    plan.update(schedule="sequential", schedule_note=f"not interleaved: one model at a time ({why}), the "
                "previous one freed and gc.collect() before the next")
    if max(sizes.values()) + HEADROOM_BYTES > available and dtype == "float32" and not dtype_forced:
        largest = max(sizes, key=sizes.get)
        plan.update(dtype="bfloat16", dtype_note=(
            f"{largest} is {sizes[largest] / 1e9:.1f} GB in float32: with {HEADROOM_BYTES >> 30} GiB headroom it does "
            f"not fit the {available / 2**30:.1f} GiB available, so the whole group runs in bfloat16"))
        sizes = {row.label: config_bytes(paper_config(row, "bfloat16"), "bfloat16") for row in group.rows}
        plan["weight_bytes"] = sizes
    if max(sizes.values()) + HEADROOM_BYTES > available:
        plan.update(schedule="skipped", schedule_note=(
            f"the largest model ({max(sizes.values()) / 1e9:.1f} GB in {plan['dtype']}) does not fit the "
            f"{available / 2**30:.1f} GiB available with {HEADROOM_BYTES >> 30} GiB headroom"))
    return plan


def add_paper_speedups(rows: list[dict]) -> list[dict]:
    """speedup_vs (in loop, per call, weight-byte ratio, and the paper's own ratio) against the
    row's baseline in the same group; the speedup_vs_dense fields the table and plot read, alike."""
    by_label = {(r["paper_group"], r["preset"]): r for r in rows}
    for r in rows:
        base = by_label.get((r["paper_group"], r["paper_baseline"] or r["preset"]))
        paper = (base["paper_s"] / r["paper_s"]) if base and base.get("paper_s") and r.get("paper_s") else None
        r["speedup_vs"] = None if base is None else {
            "baseline": base["preset"],
            "in_loop": reporting.speedup(base["ms_per_token"], r["ms_per_token"]),
            "per_call": reporting.speedup(base["per_call_ms_per_token"], r["per_call_ms_per_token"]),
            "weight_byte_ratio": base["bytes_per_token"] / r["bytes_per_token"],
            "paper": paper,
        }
        r["dense_baseline"] = base["preset"] if base else None
        r["speedup_vs_dense"] = r["speedup_vs"]["in_loop"] if base else None
        r["per_call_speedup_vs_dense"] = r["speedup_vs"]["per_call"] if base else None
        r["byte_ratio_vs_dense"] = r["speedup_vs"]["weight_byte_ratio"] if base else None
    return rows


def format_paper_table(rows: list[dict]) -> str:
    head = (f"{'row':<46}{'dtype':>9}{'ms/tok':>10}{'per-call':>10}{'prefill':>9}{'speedup':>9}{'per-call':>9}"
            f"{'bytes x':>9}{'paper':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        sv = r["speedup_vs"] or {}
        fmt = lambda v, unit="x": "-" if v is None else f"{v:.2f}{unit}"  # noqa: E731
        lines.append(f"{r['preset']:<46}{r['dtype']:>9}{r['ms_per_token']:>10.1f}{r['per_call_ms_per_token']:>10.1f}"
                     f"{r['prefill_ms']:>9.0f}{fmt(sv.get('in_loop')):>9}{fmt(sv.get('per_call')):>9}"
                     f"{fmt(sv.get('weight_byte_ratio')):>9}{fmt(sv.get('paper')):>8}")
    lines.append("ms/tok: median per token inside one jitted loop; per-call: one jitted call per token (the "
                 "reference's protocol); speedups against the group's dense row; paper: the paper's own ratio")
    return "\n".join(lines)


def run_paper_rows(args, info: dict, backend: str, bandwidth: dict) -> tuple[list[dict], list[dict]]:
    """Times the groups of --paper_groups -> (result rows, one record per group)."""
    rows_out, groups_out = [], []
    for gname in args.paper_groups:
        group = PAPER_GROUPS[gname]
        available = machine.host_memory_bytes(available=True) if backend == "cpu" else \
            (info.get("device_memory_bytes") or machine.host_memory_bytes(available=True))
        plan = plan_group(group, args.dtype, available, dtype_forced=args.dtype_forced)
        tokens = group.tokens if group.tokens and not args.quick else args.tokens
        gargs = argparse.Namespace(**{
            **vars(args), "dtype": plan["dtype"], "tokens": tokens,
            "per_call_tokens": tokens if group.tokens and not args.quick else args.per_call_tokens,
            "repeats": group.repeats if group.repeats and not args.quick else args.repeats})
        record = {"group": gname, "title": group.title, **plan, "tokens": gargs.tokens,
                  "per_call_tokens": gargs.per_call_tokens, "repeats": gargs.repeats,
                  "bandwidth": bandwidth, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        groups_out.append(record)
        print(f"group {gname} ({group.title}): {plan['schedule']}, {plan['dtype']}; {plan['schedule_note']}; "
              f"{plan['dtype_note']}", flush=True)
        if plan["schedule"] == "skipped":
            continue
        prepared = []
        for row in group.rows:
            print(f"preparing {row.label} ({plan['weight_bytes'][row.label] / 1e9:.1f} GB, {plan['dtype']}) ...",
                  flush=True)
            meta, timer = prepare_preset(row.label, gargs, backend=backend, capacity_bytes=available,
                                         config=paper_config(row, plan["dtype"]))
            meta.update({"paper_group": gname, "paper_row": row.paper_row, "paper_s": row.paper_s,
                         "paper_baseline": row.baseline, "overrides": dict(row.overrides),
                         "schedule": plan["schedule"], "weight_bytes": plan["weight_bytes"][row.label]})
            if plan["schedule"] == "interleaved":
                prepared.append((meta, timer))
                continue
            run_timers([timer], gargs)
            rows_out.append(finish_preset(meta, timer, bandwidth))
            print(reporting.decode_line(rows_out[-1]), flush=True)
            del timer, meta
            gc.collect()
        if prepared:
            print(f"timing {len(prepared)} models, {gargs.repeats} interleaved repeats ...", flush=True)
            run_timers([timer for _, timer in prepared], gargs)
            for meta, timer in prepared:
                rows_out.append(finish_preset(meta, timer, bandwidth))
                print(reporting.decode_line(rows_out[-1]), flush=True)
            del prepared
            gc.collect()
    add_paper_speedups(rows_out)
    return rows_out, groups_out


def merge_previous(path: pathlib.Path, rows: list[dict], groups: list[dict]) -> tuple[list[dict], list[dict]]:
    """Keeps the groups of an earlier paper-rows file that this run did not time (each group records
    its own time, bandwidth and schedule; speedups never cross groups)."""
    if not path.exists():
        return rows, groups
    import json

    try:
        old = json.loads(path.read_text())
    except ValueError:
        return rows, groups
    ran = {g["group"] for g in groups}
    kept_groups = [g for g in old.get("groups", []) if g["group"] not in ran]
    kept_rows = [r for r in old.get("results", []) if r.get("paper_group") not in ran]
    order = list(PAPER_GROUPS)
    key = lambda g: order.index(g) if g in order else len(order)  # noqa: E731
    return (sorted(kept_rows + rows, key=lambda r: key(r["paper_group"])),
            sorted(kept_groups + groups, key=lambda g: key(g["group"])))


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
    p.add_argument("--xla_flags", default="",
                   help="XLA flags for this run (e.g. --xla_cpu_multi_thread_eigen=false), added to XLA_FLAGS before "
                        "JAX starts and recorded in the JSON (settings.xla_flags); none by default: on the 2-core "
                        "CPU that flag with --xla_cpu_enable_concurrency_optimized_scheduler=false made dense and "
                        "sparse decoding slower (docs/benchmarks.md)")
    p.add_argument("--cpu_kernels", choices=("auto", "off", "compare"), default="auto",
                   help="the compiled CPU decode kernels of the sparse layers (docs/kernels.md): auto (default) "
                        "uses them where the Decoder does (CPU backend, library built); off: the pure-JAX path; "
                        "compare: each preset that uses them is timed on the pure-JAX path too, same weights, "
                        "same run (rows with decode_path \"jax\")")
    p.add_argument("--sequential", action="store_true",
                   help="time one preset at a time even when all fit memory (default: interleave the repeats)")
    p.add_argument("--paper_rows", action="store_true",
                   help="the paper's rows instead of --presets: the reference's encoder-decoders (800M dense vs "
                        "Sparse FF+QKV, the Terraformer; the 17B slices), speedups within each pair; writes "
                        "decode_paper_{cpu,gpu}.json")
    p.add_argument("--paper_groups", default=",".join(PAPER_GROUPS),
                   help=f"with --paper_rows: which groups ({', '.join(PAPER_GROUPS)}); the file keeps the other "
                        "groups of an earlier run")
    args = p.parse_args(argv)
    args.paper_groups = [g.strip() for g in args.paper_groups.split(",") if g.strip()]
    unknown = [g for g in args.paper_groups if g not in PAPER_GROUPS]
    if unknown:
        p.error(f"--paper_groups: unknown {', '.join(unknown)} (known: {', '.join(PAPER_GROUPS)})")
    if args.paper_rows and args.cpu_kernels == "compare":
        p.error("--cpu_kernels=compare times --presets: the paper rows take auto or off")
    if args.paper_rows and args.presets:
        p.error("--paper_rows times its own presets: leave out --presets")
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
    if args.xla_flags and args.xla_flags not in os.environ.get("XLA_FLAGS", ""):
        raise SystemExit("--xla_flags is read when JAX starts: give it on this script's command line "
                         "(python benchmarks/decode_latency.py --xla_flags=...), or set XLA_FLAGS yourself")
    backend = jax.default_backend()
    args.dtype_forced = args.dtype is not None
    args.dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    try:
        presets = [] if args.paper_rows else resolve_presets(args.presets)
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

    if args.paper_rows:
        return main_paper_rows(args, info, backend, bandwidth)
    interleave = fits_together(presets, args, capacity) and not args.sequential
    print(f"schedule: {'repeats interleaved across presets' if interleave else 'one preset at a time'}", flush=True)

    results, prepared = [], []
    for name in presets:
        print(f"preparing {name} ...", flush=True)
        meta, timer = prepare_preset(name, args, backend=backend, capacity_bytes=capacity)
        pair = [(meta, timer)]
        if args.cpu_kernels == "compare":
            pair += [twin] if (twin := jax_path_twin(name, meta, timer, args)) else []
        if interleave:
            prepared += pair
            continue
        run_timers([t for _, t in pair], args)
        for meta, timer in pair:
            results.append(finish_preset(meta, timer, bandwidth))
            print(reporting.decode_line(results[-1]), flush=True)
        del timer, pair
        gc.collect()
    if interleave:
        print(f"timing {len(prepared)} presets, {args.repeats} interleaved repeats ...", flush=True)
        run_timers([timer for _, timer in prepared], args)
        for meta, timer in prepared:
            results.append(finish_preset(meta, timer, bandwidth))
            print(reporting.decode_line(results[-1]), flush=True)
    reporting.add_speedups(results)

    print(reporting.format_decode_table(results, bandwidth))
    kind = machine.machine_kind(backend)
    out_dir = pathlib.Path(args.out_dir)
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "dtype_forced", "paper_rows",
                                                                  "paper_groups")}
    report = {
        **reporting.run_header("unbatched greedy decode latency", info),
        "bandwidth": bandwidth,
        "settings": {**settings, "init": models.INIT, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "cpu_kernels_status": cpu_kernels.status()},
        "schedule": "interleaved" if interleave else "sequential",
        "results": results,
    }
    reporting.write_json(out_dir / f"decode_{kind}.json", report)
    if not args.no_plot:
        reporting.plot_decode(results, out_dir / f"decode_{kind}.png",
                              f"{', '.join(info['devices'])}, {args.dtype}, batch 1, "
                              f"{args.tokens} tokens after a {args.prompt_len}-token prompt")
    return report


def main_paper_rows(args, info: dict, backend: str, bandwidth: dict) -> dict:
    """--paper_rows: the groups, their table, decode_paper_{kind}.json and .png."""
    rows, groups = run_paper_rows(args, info, backend, bandwidth)
    if rows:
        print(format_paper_table(rows))
    kind = machine.machine_kind(backend)
    out_dir = pathlib.Path(args.out_dir)
    path = out_dir / f"decode_paper_{kind}.json"
    rows, groups = merge_previous(path, rows, groups)
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "presets", "dtype_forced")}
    settings["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    settings["cpu_kernels_status"] = cpu_kernels.status()
    report = {
        **reporting.run_header("unbatched greedy decode latency, the paper's encoder-decoder rows", info),
        "protocol": ("batch 1, greedy, random weights; the prompt is the encoder input, the decoder starts from "
                     "token 0 (prefill = encoder + cross K/V + start token); then tokens decoded with the caches, "
                     "in one jitted loop (ms_per_token) and one jitted call per token (per_call_ms_per_token, the "
                     "reference's protocol); speedup_vs within each group"),
        "bandwidth": bandwidth,
        "settings": {**settings, "init": models.INIT},
        "groups": groups,
        "results": rows,
    }
    reporting.write_json(path, report)
    if rows and not args.no_plot:
        reporting.plot_decode(rows, out_dir / f"decode_paper_{kind}.png",
                              f"{', '.join(info['devices'])}, batch 1, encoder-decoders: {args.prompt_len}-token "
                              f"encoder input; dtype and tokens per group in the JSON")
    return report


# XLA's CPU dots upcast bfloat16 weights to float32 copies. Its concurrency-optimized scheduler (the
# default) makes every copy of a program at once, before the dots: the 17B slices' prefill would hold
# 17 GB of copies beside 9 GB of weights; and while-loop invariant code motion hoists the copies out of
# the jitted decode loop (12.5 GB, and the loop would then read float32 copies, not the bfloat16
# weights). With both off a program converts one weight at a time, per token (temporaries 1.5-2.4 GB).
# Set for every --paper_rows process, before JAX starts; recorded in the JSON (settings.xla_flags).
PAPER_ROWS_XLA_FLAG = ("--xla_cpu_enable_concurrency_optimized_scheduler=false "
                       "--xla_disable_hlo_passes=while-loop-invariant-code-motion")


def xla_flags_from_argv(argv: list[str]) -> str:
    """The --xla_flags value on a command line ('' if absent), read before argparse: XLA parses
    XLA_FLAGS when JAX starts its backend, which main() does first."""
    for i, arg in enumerate(argv):
        if arg.startswith("--xla_flags="):
            return arg.split("=", 1)[1]
        if arg == "--xla_flags" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


if __name__ == "__main__":
    if xla_flags_from_argv(sys.argv[1:]):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags_from_argv(sys.argv[1:])}".strip()
    if "--paper_rows" in sys.argv[1:]:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {PAPER_ROWS_XLA_FLAG}".strip()
    main()
