"""What the benchmarks write: the figures derived from decode timings, the JSON files (machine,
devices, library versions, settings, every figure), console tables and plots.

Field names are those of the committed files under benchmarks/results/; docs/benchmarks.md says how
each figure is computed.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax.numpy as jnp
import numpy as np

from benchmarks import machine


# --------------------------------------------------------------------------------------------
# Derived decode figures (docs/benchmarks.md, "Figures derived from the timings")

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


def bandwidth_figures(nbytes: float, ms_per_token: float, bandwidth: dict) -> dict:
    """A result's figures against the memory bandwidths measured in the same run
    (machine.measure_bandwidth): the copy bandwidth, and the read bandwidth, which is the floor that
    matters for decoding (it only reads weights)."""
    copy_gb_per_s, read_gb_per_s = bandwidth["gb_per_s"], bandwidth["read_gb_per_s"]
    return {"implied_gb_per_s": implied_gb_per_s(nbytes, ms_per_token),
            "bandwidth_fraction": bandwidth_fraction(nbytes, ms_per_token, copy_gb_per_s),
            "floor_ms_per_token": nbytes / (copy_gb_per_s * 1e9) * 1e3,
            "read_bandwidth_fraction": bandwidth_fraction(nbytes, ms_per_token, read_gb_per_s),
            "read_floor_ms_per_token": nbytes / (read_gb_per_s * 1e9) * 1e3}


def add_speedups(results: list[dict]) -> list[dict]:
    """Fills speedup_vs_dense (in-loop and per-call) against the dense result of the same size group
    and layer count; None where the run has no such baseline."""
    for r in results:  # int8 rows against the int8 dense row: the dense model gets the same int8 care
        base = next((b for b in results if b["dense"] and b["size_group"] == r["size_group"]
                     and b["n_layers"] == r["n_layers"] and b.get("weights", "float") == r.get("weights", "float")
                     and b.get("label", "").endswith("@jax") == r.get("label", "").endswith("@jax")), None)
        r["dense_baseline"] = base["preset"] if base else None
        r["speedup_vs_dense"] = speedup(base["ms_per_token"], r["ms_per_token"]) if base else None
        r["per_call_speedup_vs_dense"] = (speedup(base["per_call_ms_per_token"], r["per_call_ms_per_token"])
                                          if base and r.get("per_call_ms_per_token") else None)
        r["byte_ratio_vs_dense"] = base["bytes_per_token"] / r["bytes_per_token"] if base else None
    for r in results:  # an int8 row against the same preset's float row
        if r.get("weights") == "int8":
            float_row = next((t for t in results if t["preset"] == r["preset"] and t.get("weights", "float") != "int8"
                              and t.get("label", t["preset"]) == r["preset"]), None)
            r["speedup_vs_float"] = speedup(float_row["ms_per_token"], r["ms_per_token"]) if float_row else None
    for r in results:  # --cpu_kernels=compare: the kernel row against its pure-JAX twin
        twin = next((t for t in results if t.get("label") == f"{r['preset']}@jax"), None)
        if r.get("decode_path") == "cpu_kernels" and twin:
            r["speedup_vs_jax_path"] = speedup(twin["ms_per_token"], r["ms_per_token"])
    return results


# --------------------------------------------------------------------------------------------
# JSON

def run_header(benchmark: str, info: dict | None = None) -> dict:
    """The fields every result file starts with: what ran, when, and on which machine (host,
    devices, library versions: benchmarks/machine.py)."""
    return {"benchmark": benchmark, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": info if info is not None else machine.machine_info()}


def write_json(path, data: dict) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}", flush=True)
    return path


# --------------------------------------------------------------------------------------------
# Console

def decode_label(r: dict) -> str:
    """A decode row's name: the preset, marked when it is the pure-JAX twin of a kernel row
    (decode_latency --cpu_kernels=compare)."""
    return r.get("label", r["preset"])


def decode_line(r: dict) -> str:
    """One preset's result as it finishes."""
    return (f"  {decode_label(r)} ({r.get('decode_path', 'jax')} path): {r['ms_per_token']:.2f} ms/token in loop, {r['per_call_ms_per_token']:.2f} ms/token "
            f"per call, prefill {r['prefill_ms']:.1f} ms, {100 * r['bandwidth_fraction']:.0f}% of copy bandwidth, "
            f"{100 * r['read_bandwidth_fraction']:.0f}% of read bandwidth "
            f"(init {r['init_s']:.1f} s, compile {r['compile_s']['loop']:.1f} s)")


def format_decode_table(results: list[dict], bandwidth: dict) -> str:
    head = (f"{'preset':<26}{'path':>8}{'layers':>7}{'dtype':>9}{'Mparam/tok':>11}{'MB/tok':>9}{'ms/tok':>9}"
            f"{'spread':>15}{'per-call':>10}{'prefill':>9}{'tok/s':>8}{'GB/s':>7}{'%BW':>6}{'%read':>7}{'speedup':>9}"
            f"{'bytes x':>9}")
    lines = [f"memory bandwidth (copy, measured in this run): {bandwidth['gb_per_s']:.1f} GB/s "
             f"(read-only {bandwidth['read_gb_per_s']:.1f} GB/s)", head, "-" * len(head)]
    for r in results:
        sp = "-" if r["speedup_vs_dense"] is None else f"{r['speedup_vs_dense']:.2f}x"
        br = "-" if r["byte_ratio_vs_dense"] is None else f"{r['byte_ratio_vs_dense']:.1f}x"
        layers = f"{r['n_layers']}/{r['full_n_layers']}" if r["n_layers"] != r["full_n_layers"] else str(r["n_layers"])
        lines.append(
            f"{decode_label(r):<26}{r.get('decode_path', 'jax').replace('cpu_kernels', 'kernels'):>8}{layers:>7}{r['dtype']:>9}{r['params_per_token'] / 1e6:>11.1f}"
            f"{r['bytes_per_token'] / 1e6:>9.1f}{r['ms_per_token']:>9.2f}"
            f"{r['ms_per_token_min']:>7.2f}-{r['ms_per_token_max']:<7.2f}{r['per_call_ms_per_token']:>10.2f}"
            f"{r['prefill_ms']:>9.1f}{r['tokens_per_s']:>8.1f}{r['implied_gb_per_s']:>7.1f}"
            f"{100 * r['bandwidth_fraction']:>5.0f}%{100 * r['read_bandwidth_fraction']:>6.0f}%{sp:>9}{br:>9}")
    notes = [f"  {r['preset']}: timed {r['layers_note']}" for r in results if r["n_layers"] != r["full_n_layers"]]
    if notes:
        lines += ["sliced models (speedups compare slices of equal depth):"] + notes
    bad = [f"{r['preset']} ({100 * r['per_call_agreement']:.0f}% equal)" for r in results
           if not r["per_call_matches_loop"]]
    if bad:
        lines.append(f"note: per-call tokens differ from in-loop tokens for {', '.join(bad)}: random weights "
                     "give near-tied argmaxes that flip between two compilations")
    lines.append("path: decoded with the compiled CPU kernels or on pure JAX (docs/kernels.md); "
                 "ms/tok: median per token inside one jitted loop; spread: min-max over repeats; per-call: "
                 "one Python call per token; %BW, %read: weight bytes per token / time over the copy and the read "
                 "bandwidth (100% = at the floor); bytes x: dense weight bytes / this preset's (the memory-bound ideal)")
    return "\n".join(lines)


def format_profile(result: dict, top: int) -> str:
    """profile_decode's ranking: the `top` ops by time per token."""
    lines = [f"{result['preset']} ({result['n_layers']} layers, {result['dtype']}): "
             f"{result['traced_ms_per_token']:.2f} ms per token under the profiler",
             f"{'us/token':>9} {'share':>6} {'calls':>6}  op (JAX operation it comes from)"]
    for row in result["ops"][:top]:
        lines.append(f"{row['us_per_token']:9.1f} {100 * row['share']:5.1f}% {row['calls_per_token']:6.1f}  "
                     f"{row['op'][:90]}")
    return "\n".join(lines)


def format_train_memory(result: dict, quick: bool) -> str:
    """train_memory's conclusions: growth with depth per stack, longest sequence per budget."""
    g = result["depth"]["growth_12_to_48"]
    lines = [f"growth {'first->last' if quick else '12->48'} layers: standard {g['standard']:+.1%}, "
             f"reversible {g['reversible']:+.1%}"]
    for entry in result["lengths"]:
        lines.append(f"longest sequence in {entry['budget_bytes'] / 2**20:.1f} MiB: full {entry['full']['longest']}, "
                     f"lsh {entry['lsh']['longest']} ({entry['lsh_over_full']:.1f}x)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_decode(results: list[dict], path, title: str) -> None:
    """Two panels: latency per token (in loop, per call, memory floor; log scale) and speedup vs
    dense (in loop, per call, weight-byte ratio)."""
    plt = _pyplot()
    names = [decode_label(r) for r in results]
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
    print(f"wrote {path}", flush=True)


def plot_train_memory(result: dict, path) -> None:
    """Two panels: step memory vs depth (standard, reversible) and vs sequence length (full, LSH)
    with the budgets."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for reversible, style in ((False, "o-"), (True, "s-")):
        rows = [r for r in result["depth"]["rows"] if r["reversible"] == reversible]
        ax1.plot([r["n_layers"] for r in rows], [r["total"] / 2**20 for r in rows], style,
                 label="reversible" if reversible else "standard")
    ax1.set_xlabel("layers")
    ax1.set_ylabel("peak training-step memory (MiB)")
    ax1.set_title(f"depth, seq {result['depth']['seq_len']}")
    ax1.legend()
    for entry, color in zip(result["lengths"], ("C0", "C1", "C2")):
        for name, style in (("full", "o"), ("lsh", "s")):
            probes = sorted(entry[name]["probes"], key=lambda p: p["seq_len"])
            ax2.plot([p["seq_len"] for p in probes], [p["total"] / 2**20 for p in probes], style + "-", color=color,
                     fillstyle="none" if name == "full" else "full",
                     label=f"{name}, budget {entry['budget_bytes'] / 2**20:.0f} MiB: longest {entry[name]['longest']}")
        ax2.axhline(entry["budget_bytes"] / 2**20, color=color, ls="--", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("sequence length")
    ax2.set_ylabel("MiB")
    ax2.set_title("reversible, full vs LSH attention")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", flush=True)
