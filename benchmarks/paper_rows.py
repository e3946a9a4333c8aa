"""The paper's rows (`decode_latency.py --paper_rows`): the reference's encoder-decoders, timed group by
group with speedups inside each group (docs/benchmarks.md, "Paper rows")."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import time

import jax.numpy as jnp

from benchmarks import machine, models, reporting
from benchmarks.decode_setup import prepare_preset, time_presets
from scaling_sparse.config import ConfigError, load_config
from scaling_sparse.kernels import cpu as cpu_kernels


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
            rows_out += time_presets([(meta, timer)], gargs, bandwidth)
            del timer, meta
            gc.collect()
        if prepared:
            print(f"timing {len(prepared)} models, {gargs.repeats} interleaved repeats ...", flush=True)
            rows_out += time_presets(prepared, gargs, bandwidth)
            del prepared
            gc.collect()
    add_paper_speedups(rows_out)
    return rows_out, groups_out


def merge_previous(path: pathlib.Path, rows: list[dict], groups: list[dict]) -> tuple[list[dict], list[dict]]:
    """Keeps the groups of an earlier paper-rows file that this run did not time (each group records
    its own time, bandwidth and schedule; speedups never cross groups)."""
    if not path.exists():
        return rows, groups
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
