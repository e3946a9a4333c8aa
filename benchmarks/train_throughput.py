"""Training-step throughput of dense vs sparse presets: step time, tokens/s, FLOPs, memory.

"Sparse training at dense cost": during training the sparse layers compute their full masked
products (the sparse FFN multiplies by a soft or straight-through mask over all d_ff units; the
multiplicative layers do as many multiply-adds as the dense layers they replace), so a sparse
preset's training step should cost about what its FLOPs say, i.e. about what the dense preset of
the same size costs. This script measures it. For each preset, in one process:

  - the state from the state builder (`state.init_train_state` on a single-device mesh), the step
    from `train.make_train_step`, compiled once (`lower(...).compile()`), a synthetic batch of
    random tokens (no data pipeline, no tokenizer);
  - XLA's cost analysis (FLOPs of the whole step) and memory analysis (temp + argument + output);
  - a warm-up step, then `--repeats` timed steps, round-robin over the presets (each timed to
    `block_until_ready` of the new state and metrics); median step time, tokens/s;
  - the analytic model FLOPs per token (`forward_flops_per_token`: matmul/convolution FLOPs per
    component; training = 3x forward, reversible stacks + 1x for the recomputation);
  - the achieved FLOP rate against a square matmul timed in the same run (`machine.measure_matmul_peak`);
  - every preset's step time, FLOPs and memory over its dense baseline's (same size group, depth,
    batch and sequence length).

  python benchmarks/train_throughput.py          # stdlib, stdlib_sparse, medium_dense, medium_sparse_all
  python benchmarks/train_throughput.py --presets='tiny,tiny[ff_sparsity=8,attn_sparsity=4,loss_sparsity=4]' --quick

A preset may carry config overrides in brackets: `name[field=value,...]`, a bare field meaning
`model.<field>`, a dotted one any config field (`train.batch_size=4`). Batch and sequence: the
preset's own `train.batch_size` / `train.seq_len`, except the medium and large presets, which use
`--medium_batch` / `--medium_seq` (CPU: 1 x 128, so a step fits 2 cores; GPU: 8 x 1024);
`--batch_size` / `--seq_len` override every preset. CPU runs in float32, GPU in bfloat16 compute
with float32 parameters (`--dtype`, `--param_dtype`). Writes
benchmarks/results/train_throughput_<cpu|gpu>.json and .png. Method: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ast
import gc
import pathlib
import re
import statistics
import sys
import textwrap
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and the checkout importable
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import machine, models, reporting  # noqa: E402
from scaling_sparse import sharding, state, train  # noqa: E402
from scaling_sparse.config import ConfigError, ModelConfig, load_config, validate  # noqa: E402

DEFAULT_PRESETS = ("stdlib", "stdlib_sparse", "medium_dense", "medium_sparse_all")
# Size groups whose batch and sequence come from --medium_batch / --medium_seq.
BIG_GROUPS = ("medium", "large")
MEDIUM_DEFAULTS = {"cpu": (1, 128), "gpu": (8, 1024)}  # (batch, seq_len) per machine kind
PEAK_N = {"cpu": 2048, "gpu": 8192}
# Share of host (CPU) or device memory every preset's state may take together when interleaving.
MEMORY_SHARE = 0.6

FLOP_FORMULAS = {
    "unit": "FLOPs of contractions (matmuls, einsums, convolutions) only, 2 per multiply-add; elementwise "
            "ops, softmax, norms, the Gumbel noise and the optimizer update are not counted",
    "attention_projections": "dense: 2 d 3d (fused QKV) + 2 d d (output); sparse QKV: 2 d d (multiplicative: "
                             "the gated [S, d] x [d, M] product, S M = d) + 2 kl M d (3 + 3 + 1) (Q, K, V "
                             "convolutions over kl positions and 3, 3, 1 modules) + 2 d d if attn_output is "
                             "dense or mult",
    "attention_scores": "full: 2 T d (Q K^T) + 2 T d (probs V) per token: the whole masked T x T square is "
                        "computed; LSH: n_hashes (8 c d + d n_buckets) Tp / T, chunk c, padded length Tp",
    "ffn": "dense: 2 d f + 2 f d; sparse: controller 2 d r + 2 r f, plus the main 2 d f + 2 f d computed in "
           "full (masked) in training; SRU branch: 2 d u + 6 u^2 + 2 u d",
    "output": "dense and multiplicative: 2 d V (the multiplicative layer's [S, d] x [d, V/S] product does "
              "d V multiply-adds); low-rank: 2 d r + 2 r V",
    "forward": "n_layers x (attention_projections + attention_scores + ffn) + output; reversible: two "
               "attentions per block",
    "train": "3 x forward (backward = 2 x forward); reversible stacks add 1 x the stack's forward "
             "(recomputed in the backward pass)",
}


# --------------------------------------------------------------------------------------------
# Analytic FLOPs

def forward_flops_per_token(m, seq_len: int) -> dict:
    """Forward-pass matmul/convolution FLOPs per token of a model (a ModelConfig or config.model) on
    sequences of `seq_len` tokens, per component (whole model) and in total. Formulas: FLOP_FORMULAS."""
    m = ModelConfig.from_config(m)
    d, f, vocab = m.d_model, m.d_ff, m.vocab_size
    if m.attn_sparsity:
        modules, kl = m.attn_sparsity, m.attn_length_kernel
        width = d // modules
        proj = 2 * d * d + 2 * kl * width * d * (3 + 3 + 1)
        proj += 2 * d * d if m.attn_output in ("dense", "mult") else 0
    else:  # Q, (K unless shared-QK LSH), V and the output projection
        proj = 2 * d * d * (3 if m.attention == "lsh" else 4)
    if m.attention == "lsh":
        from scaling_sparse.layers.lsh import default_n_buckets

        chunk = min(m.lsh_chunk_len, seq_len)
        padded = -(-seq_len // chunk) * chunk
        buckets = m.lsh_n_buckets or default_n_buckets(padded, m.lsh_chunk_len)
        scores = m.lsh_n_hashes * (8 * chunk * d + (d * buckets if buckets > 1 else 0)) * padded / seq_len
    else:
        scores = 4 * seq_len * d
    ffn = 4 * d * f
    if m.ff_sparsity:
        ffn += 2 * d * m.ff_rank + 2 * m.ff_rank * f
    if m.ff_sru_units:
        u = m.ff_sru_units
        ffn += 4 * d * u + 6 * u * u
    if m.loss_type == "lowrank" and (m.loss_lowrank or m.loss_sparsity):
        out = 2 * d * m.loss_lowrank + 2 * m.loss_lowrank * vocab
    else:
        out = 2 * d * vocab
    attentions = 2 if m.reversible else 1
    flops = {"attention_projections": m.n_layers * attentions * proj,
             "attention_scores": m.n_layers * attentions * scores,
             "ffn": m.n_layers * ffn,
             "output": out}
    flops = {k: float(v) for k, v in flops.items()}
    flops["total"] = sum(flops.values())
    return flops


def train_flops_per_token(m, seq_len: int) -> float:
    """Training FLOPs per token: 3 x forward; a reversible stack recomputes its forward pass once more."""
    m = ModelConfig.from_config(m)
    fwd = forward_flops_per_token(m, seq_len)
    recompute = fwd["total"] - fwd["output"] if m.reversible else 0.0
    return 3.0 * fwd["total"] + recompute


# --------------------------------------------------------------------------------------------
# Presets with overrides

def split_specs(text: str) -> list[str]:
    """'a,b[x=1,y=2]' -> ['a', 'b[x=1,y=2]']: commas inside brackets do not separate presets."""
    specs, depth, current = [], 0, []
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            specs.append("".join(current))
            current = []
        else:
            current.append(ch)
    specs.append("".join(current))
    return [s.strip() for s in specs if s.strip()]


def _literal(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """'tiny[ff_sparsity=8,train.batch_size=2]' -> ('tiny', {'model.ff_sparsity': 8, 'train.batch_size': 2})."""
    match = re.fullmatch(r"\s*([^\[\]]+?)\s*(?:\[(.*)\])?\s*", spec)
    if not match:
        raise ConfigError(f"preset {spec!r}: expected NAME or NAME[field=value,...]")
    overrides = {}
    for item in split_specs(match.group(2) or ""):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"preset {spec!r}: override {item!r} is not field=value")
        key = key.strip()
        overrides[key if "." in key else f"model.{key}"] = _literal(value.strip())
    return match.group(1), overrides


def apply_overrides(config, overrides: dict, spec: str = ""):
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            if part not in node:
                raise ConfigError(f"preset {spec!r}: unknown config section {part!r} in {key!r}")
            node = node[part]
        if last not in node:
            raise ConfigError(f"preset {spec!r}: unknown config field {key!r}")
        try:
            node[last] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"preset {spec!r}: cannot set {key} = {value!r}: {e}") from None
    return config


def medium_defaults(args, kind: str) -> tuple[int, int]:
    batch, seq = MEDIUM_DEFAULTS.get(kind, MEDIUM_DEFAULTS["gpu"])
    return args.medium_batch or batch, args.medium_seq or seq


def bench_config(spec: str, args, kind: str = "cpu"):
    """A preset (with its bracket overrides) as benchmarked -> (config, base preset, overrides):
    compute dtype --dtype, parameters --param_dtype, the batch and sequence length of the run."""
    base, overrides = parse_spec(spec)
    config = apply_overrides(load_config(base).copy_and_resolve_references(), overrides, spec)
    t = config.train
    if models.size_group(base) in BIG_GROUPS:
        batch, seq = medium_defaults(args, kind)
        batch = t.batch_size if "train.batch_size" in overrides else batch
        seq = t.seq_len if "train.seq_len" in overrides else seq
    else:
        batch, seq = t.batch_size, t.seq_len
    t.batch_size, t.seq_len = args.batch_size or batch, args.seq_len or seq
    t.seed = args.seed
    config.model.dtype = args.dtype
    config.model.param_dtype = args.param_dtype
    return validate(config), base, overrides


# --------------------------------------------------------------------------------------------
# One preset's step

def _first(analysis):
    """cost_analysis() is a dict, or a list of one dict in older JAX."""
    if isinstance(analysis, (list, tuple)):
        return analysis[0] if analysis else {}
    return analysis or {}


class StepTimer:
    """One preset's compiled train step, its train state and a synthetic batch. Compiles on
    construction (nothing allocated); `materialize` builds the state and runs the warm-up steps;
    each `step_once` adds one timed step, so main() can interleave the presets' repeats."""

    def __init__(self, spec: str, config, *, base: str, overrides: dict):
        self.spec, self.config, self.base, self.overrides = spec, config, base, overrides
        self.mesh = sharding.single_device_mesh()
        self.rules = sharding.logical_rules(config.mesh)
        t = config.train
        self.batch_size, self.seq_len = t.batch_size, t.seq_len
        self.layout = state.train_state_layout(config, self.mesh)
        step = train.make_train_step(self.layout, t)
        shardings = train.batch_shardings(self.mesh, self.rules)
        abstract_batch = {k: jax.ShapeDtypeStruct((self.batch_size, self.seq_len),
                                                  jnp.float32 if k == "weights" else jnp.int32, sharding=s)
                          for k, s in shardings.items()}
        start = time.perf_counter()
        self.lowered = step.lower(self.layout.abstract, abstract_batch)
        self.compiled = self.lowered.compile()
        self.compile_s = time.perf_counter() - start
        cost = _first(self.compiled.cost_analysis())
        self.xla_flops = float(cost["flops"]) if "flops" in cost else None
        self.xla_bytes_accessed = float(cost["bytes accessed"]) if "bytes accessed" in cost else None
        mem = self.compiled.memory_analysis()
        self.memory = {"temp": int(mem.temp_size_in_bytes), "argument": int(mem.argument_size_in_bytes),
                       "output": int(mem.output_size_in_bytes), "alias": int(mem.alias_size_in_bytes)}
        self.memory["total"] = self.memory["temp"] + self.memory["argument"] + self.memory["output"]
        self.state = self.batch = None
        self.times, self.warmup_ms, self.init_s, self.loss = [], [], None, None

    @property
    def resident_bytes(self) -> int:
        """What stays allocated between steps: the train state and the batch (the step's arguments)."""
        return self.memory["argument"]

    @property
    def transient_bytes(self) -> int:
        """What one step adds while it runs: temporaries and the outputs not aliased to the donated state."""
        return self.memory["temp"] + self.memory["output"] - self.memory["alias"]

    def materialize(self, warmup: int = 1, seed: int = 0) -> None:
        start = time.perf_counter()
        _, self.state = state.init_train_state(self.config, self.mesh)
        jax.block_until_ready(self.state)
        self.init_s = time.perf_counter() - start
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, self.config.model.vocab_size, (self.batch_size, self.seq_len + 1), dtype=np.int32)
        self.batch = train.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                         "weights": np.ones((self.batch_size, self.seq_len), np.float32)},
                                        self.mesh, self.rules)
        for _ in range(warmup):
            self.warmup_ms.append(self._step() * 1e3)

    def _step(self) -> float:
        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch)  # the state is donated
        jax.block_until_ready((self.state, metrics))
        elapsed = time.perf_counter() - start
        self.loss = metrics["loss"]
        return elapsed

    def step_once(self) -> None:
        self.times.append(self._step() * 1e3)

    def release(self) -> None:
        self.state = self.batch = None
        gc.collect()

    def summary(self, peak_flops_per_s: float) -> dict:
        m = ModelConfig.from_config(self.config.model)
        tokens = self.batch_size * self.seq_len
        fwd = forward_flops_per_token(m, self.seq_len)
        per_token = train_flops_per_token(m, self.seq_len)
        step_ms = statistics.median(self.times)
        step_s = step_ms / 1e3
        counts = models.param_report(self.config)
        loss = float(self.loss)
        xla = self.xla_flops
        return {
            "preset": self.spec, "base_preset": self.base,
            "overrides": {k: v for k, v in self.overrides.items()},
            "size_group": models.size_group(self.base), "dense": models.is_dense(m),
            "n_layers": m.n_layers, "d_model": m.d_model, "d_ff": m.d_ff, "vocab_size": m.vocab_size,
            "ff_sparsity": m.ff_sparsity, "ff_rank": m.ff_rank, "attn_sparsity": m.attn_sparsity,
            "loss_sparsity": m.loss_sparsity, "loss_type": m.loss_type, "reversible": bool(m.reversible),
            "attention": m.attention, "ff_sru_units": m.ff_sru_units,
            "dropout": m.dropout, "attn_dropout": m.attn_dropout,
            "dtype": m.dtype, "param_dtype": m.param_dtype, "optimizer": self.config.train.optimizer,
            "batch_size": self.batch_size, "seq_len": self.seq_len, "tokens_per_step": tokens,
            "total_params": counts["total_params"], "params_per_token": counts["params_per_token"],
            "step_ms": step_ms, "step_ms_min": min(self.times), "step_ms_max": max(self.times),
            "step_ms_stdev": statistics.stdev(self.times) if len(self.times) > 1 else 0.0,
            "step_ms_repeats": list(self.times), "warmup_ms": list(self.warmup_ms),
            "tokens_per_s": tokens / step_s,
            "forward_flops_per_token": fwd,
            "train_flops_per_token": per_token,
            "train_flops_per_step": per_token * tokens,
            "xla_flops_per_step": xla,
            "xla_flops_per_token": xla / tokens if xla is not None else None,
            "xla_over_analytic": xla / (per_token * tokens) if xla is not None else None,
            "xla_bytes_accessed_per_step": self.xla_bytes_accessed,
            # XLA's cost analysis counts a while loop's body once: the reversible stack's lax.scan over
            # its blocks is counted as one block (measured: the XLA figure does not grow with depth).
            "xla_flops_note": ("reversible stack: XLA counts the lax.scan body (one block) once, so xla_flops "
                               "undercounts" if m.reversible else None),
            "model_flops_per_s": per_token * tokens / step_s,
            "model_flops_fraction_of_peak": per_token * tokens / step_s / peak_flops_per_s,
            "xla_flops_per_s": xla / step_s if xla is not None else None,
            "xla_flops_fraction_of_peak": xla / step_s / peak_flops_per_s if xla is not None else None,
            "memory": dict(self.memory),
            "compile_s": self.compile_s, "init_s": self.init_s,
            "final_loss": loss, "loss_finite": bool(np.isfinite(loss)),
        }


# --------------------------------------------------------------------------------------------
# Figures across presets

def add_ratios(results: list[dict]) -> list[dict]:
    """Every result over its dense baseline: the dense result of the same size group, depth, batch
    and sequence length in the same run (None where there is none). > 1 means costlier than dense."""
    def ratio(a, b):
        return a / b if a is not None and b else None

    for r in results:
        base = next((b for b in results if b["dense"] and b["size_group"] == r["size_group"]
                     and b["n_layers"] == r["n_layers"] and b["batch_size"] == r["batch_size"]
                     and b["seq_len"] == r["seq_len"]), None)
        r["dense_baseline"] = base["preset"] if base else None
        get = (lambda key: ratio(r[key], base[key])) if base else (lambda key: None)
        r["step_time_vs_dense"] = get("step_ms")
        r["train_flops_vs_dense"] = get("train_flops_per_token")
        r["xla_flops_vs_dense"] = get("xla_flops_per_step")
        r["memory_vs_dense"] = ratio(r["memory"]["total"], base["memory"]["total"]) if base else None
        r["params_vs_dense"] = get("total_params")
    return results


def format_table(results: list[dict], peak: dict) -> str:
    head = (f"{'preset':<26}{'batch':>9}{'ms/step':>10}{'spread':>17}{'tok/s':>9}{'MFLOP/tok':>11}"
            f"{'XLA/an.':>8}{'GFLOP/s':>9}{'%peak':>7}{'MiB':>9}{'time x':>8}{'FLOP x':>8}{'XLA x':>7}")
    lines = [f"matmul peak (measured in this run): {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
             f"({peak['dtype']}, {peak['n']} x {peak['n']})", head, "-" * len(head)]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in results:
        name = r["preset"] if len(r["preset"]) <= 25 else r["preset"][:22] + "..."
        lines.append(
            f"{name:<26}{r['batch_size']:>4}x{r['seq_len']:<4}{r['step_ms']:>10.1f}"
            f"{r['step_ms_min']:>8.1f}-{r['step_ms_max']:<8.1f}{r['tokens_per_s']:>9.0f}"
            f"{r['train_flops_per_token'] / 1e6:>11.2f}{fmt(r['xla_over_analytic'], '.2f'):>8}"
            f"{r['model_flops_per_s'] / 1e9:>9.2f}{100 * r['model_flops_fraction_of_peak']:>6.0f}%"
            f"{r['memory']['total'] / 2**20:>9.1f}{fmt(r['step_time_vs_dense'], '.2f'):>8}"
            f"{fmt(r['train_flops_vs_dense'], '.2f'):>8}{fmt(r['xla_flops_vs_dense'], '.2f'):>7}")
    bad = [r["preset"] for r in results if not r["loss_finite"]]
    if bad:
        lines.append(f"note: non-finite loss after the timed steps for {', '.join(bad)}")
    lines.append("ms/step: median of the timed steps; MFLOP/tok: analytic training FLOPs per token (3 x forward); "
                 "XLA/an.: XLA's step FLOPs / analytic; GFLOP/s and %peak: analytic FLOPs / step time, over the "
                 "measured matmul rate; MiB: XLA's temp + argument + output; time x, FLOP x, XLA x: over the "
                 "dense baseline")
    return "\n".join(lines)


def plot(results: list[dict], path, title: str) -> None:
    """Two panels: step time per preset (with the time each would take at its dense baseline's FLOP
    rate: dense step time x FLOP ratio), and step time, analytic FLOPs and XLA FLOPs over dense."""
    plt = reporting._pyplot()
    names = [r["preset"] for r in results]
    x = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10, 1.8 * len(names)), 4.8))
    ax1.bar(x, [r["step_ms"] for r in results], 0.6, label="median step time (bar: min-max)",
            yerr=[[r["step_ms"] - r["step_ms_min"] for r in results],
                  [r["step_ms_max"] - r["step_ms"] for r in results]], ecolor="grey", capsize=3)
    by_name = {r["preset"]: r for r in results}
    expect = [by_name[r["dense_baseline"]]["step_ms"] * r["train_flops_vs_dense"] if r["dense_baseline"] else np.nan
              for r in results]
    ax1.plot(x, expect, "_", color="C3", markersize=26, markeredgewidth=2.5,
             label="dense step time x analytic FLOP ratio")
    ax1.set_ylabel("ms per training step")
    ax1.set_yscale("log")
    times = [r["step_ms_min"] for r in results] + [r["step_ms_max"] for r in results]
    ax1.set_ylim(0.5 * min(times), 4 * max(times))
    ax1.set_title("training step time")
    ax2.bar(x, [r["step_time_vs_dense"] or 0 for r in results], 0.6, label="step time / dense")
    ax2.plot(x, [r["train_flops_vs_dense"] or np.nan for r in results], "k_", markersize=22,
             markeredgewidth=2, label="analytic FLOPs / dense")
    ax2.plot(x, [r["xla_flops_vs_dense"] or np.nan for r in results], "rx", markersize=8,
             label="XLA FLOPs / dense")
    ax2.axhline(1.0, color="grey", lw=0.8)
    top = max([v for r in results for v in (r["step_time_vs_dense"], r["train_flops_vs_dense"],
                                            r["xla_flops_vs_dense"]) if v] or [1.0])
    ax2.set_ylim(0, 1.35 * top)
    ax2.set_ylabel("ratio to the dense preset of the same size")
    ax2.set_title("cost vs dense (1 = dense cost)")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels([textwrap.fill(n, 24) + f"\n({r['batch_size']} x {r['seq_len']})"
                            for n, r in zip(names, results)], rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


# --------------------------------------------------------------------------------------------
# Entry point

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="",
                   help="comma-separated presets (names, config paths, NAME[field=value,...]); default: "
                        + ",".join(DEFAULT_PRESETS))
    p.add_argument("--repeats", type=int, default=None, help="timed steps per preset (default 5, --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per preset after compilation")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--param_dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter (and optimizer) storage dtype")
    p.add_argument("--batch_size", type=int, default=None, help="batch of every preset (default: see above)")
    p.add_argument("--seq_len", type=int, default=None, help="sequence length of every preset")
    p.add_argument("--medium_batch", type=int, default=None, help="batch of medium/large presets (CPU 1, GPU 8)")
    p.add_argument("--medium_seq", type=int, default=None,
                   help="sequence length of medium/large presets (CPU 128, GPU 1024)")
    p.add_argument("--peak_n", type=int, default=None,
                   help="size of the square matmul measuring the peak (CPU 2048, GPU 8192, --quick 512)")
    p.add_argument("--peak_repeats", type=int, default=None, help="timed matmuls (default 10, --quick 3)")
    p.add_argument("--sequential", action="store_true",
                   help="time one preset at a time (default: interleave the repeats when all states fit)")
    p.add_argument("--quick", action="store_true", help="a development run: 2 repeats, a 512 matmul probe")
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no_plot", action="store_true", help="skip the matplotlib plot")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.peak_repeats is None:
        args.peak_repeats = 3 if args.quick else 10
    for name in ("repeats", "peak_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup",):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "seq_len", "medium_batch", "medium_seq", "peak_n"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    return args


def prepare_configs(args, kind: str) -> list[tuple]:
    """[(spec, config, base, overrides)]; an unknown preset or a bad override fails before any work."""
    specs = split_specs(args.presets) or list(DEFAULT_PRESETS)
    return [(spec, *bench_config(spec, args, kind)) for spec in specs]


def run_timers(timers: list[StepTimer], repeats: int) -> None:
    """The timed steps, round-robin over the presets: a slow spell of a shared machine slows one step
    of each preset rather than one preset's whole measurement."""
    for _ in range(repeats):
        for timer in timers:
            timer.step_once()


def main(argv=None) -> dict:
    args = parse_args(argv)
    backend = jax.default_backend()
    kind = machine.machine_kind(backend)
    try:
        prepared = prepare_configs(args, kind)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    info = machine.machine_info()
    capacity = info.get("device_memory_bytes") or info["host_memory_bytes"]
    print(f"device: {', '.join(info['devices'])} | {info['cpu_count']} CPU cores | dtype {args.dtype} "
          f"(parameters {args.param_dtype}) | {args.repeats} timed steps per preset", flush=True)

    peak_n = args.peak_n or (512 if args.quick else PEAK_N.get(kind, PEAK_N["gpu"]))
    peak = machine.measure_matmul_peak(peak_n, args.dtype, repeats=args.peak_repeats, seed=args.seed)
    print(f"matmul peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({args.dtype}, {peak_n} x {peak_n})", flush=True)

    timers = []
    for spec, config, base, overrides in prepared:
        print(f"compiling {spec} (batch {config.train.batch_size} x {config.train.seq_len}) ...", flush=True)
        timers.append(StepTimer(spec, config, base=base, overrides=overrides))
    need = sum(t.resident_bytes for t in timers) + max(t.transient_bytes for t in timers)
    interleave = not args.sequential and need <= MEMORY_SHARE * capacity
    print(f"schedule: {'steps interleaved across presets' if interleave else 'one preset at a time'} "
          f"(all states together {need / 2**30:.2f} GiB of {capacity / 2**30:.0f} GiB)", flush=True)

    results = []
    if interleave:
        for timer in timers:
            print(f"initialising {timer.spec} ...", flush=True)
            timer.materialize(args.warmup, args.seed)
        run_timers(timers, args.repeats)
        results = [timer.summary(peak["flops_per_s"]) for timer in timers]
    else:
        for timer in timers:
            print(f"initialising {timer.spec} ...", flush=True)
            timer.materialize(args.warmup, args.seed)
            run_timers([timer], args.repeats)
            results.append(timer.summary(peak["flops_per_s"]))
            timer.release()
    for r in results:
        print(f"  {r['preset']}: {r['step_ms']:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s "
              f"(compile {r['compile_s']:.1f} s, init {r['init_s']:.1f} s, loss {r['final_loss']:.3f})", flush=True)
    add_ratios(results)
    print(format_table(results, peak))

    out_dir = pathlib.Path(args.out_dir)
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    settings.update(peak_n=peak_n, presets=[spec for spec, *_ in prepared])
    report = {
        **reporting.run_header("training step throughput", info),
        "matmul_peak": peak,
        "settings": settings,
        "schedule": "interleaved" if interleave else "sequential",
        "flop_formulas": FLOP_FORMULAS,
        "results": results,
    }
    reporting.write_json(out_dir / f"train_throughput_{kind}.json", report)
    if not args.no_plot:
        plot(results, out_dir / f"train_throughput_{kind}.png",
             f"{', '.join(info['devices'])}, {args.dtype}, training step (forward, backward, "
             f"{results[0]['optimizer']} update)")
    return report


if __name__ == "__main__":
    main()
