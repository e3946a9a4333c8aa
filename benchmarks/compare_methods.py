"""Ways to make a decoder smaller, side by side: trained-sparse presets, SVD and ASVD factorisation,
and CoFi structured pruning, on the same data, the same decode harness and the same machine
(issue 16; docs/compression.md).

Each entry is an ordinary workdir made with the project's own commands (subprocesses, exactly as a
user runs them):
  - dense and each sparse variant: `python -m scaling_sparse train` for --steps steps;
  - svd / asvd at three --keep fractions and cofi at three target sparsities: `python -m scaling_sparse
    compress` from the dense workdir (no --config: the workdir's stored one). SVD and ASVD train
    nothing; CoFi's pruning steps are counted and reported as extra training steps.
Then, in this process, for every workdir: validation log-perplexity (train.evaluate, the same
validation batches: compress copies the dense run's tokenizer), parameters read per decoded token
(params.report_params), and CPU decode latency with decode_timing.py's DecodeTimer (batch 1, a
16-token prompt, tokens decoded in one jitted loop), the repeats interleaved round-robin over all
entries so a slow spell of the machine slows all alike.

  python benchmarks/compare_methods.py                 # the stdlib size, ~40 min on 2 CPU cores
  python benchmarks/compare_methods.py --quick         # the tiny preset, one point per method (tests)

Workdirs under --root (default workdirs/compare_methods) are reused: a finished training run resumes
to its last step and stops, a compressed workdir with its compression.json is kept. Writes
benchmarks/results/compression_{cpu,gpu}.json and .png (log-perplexity against ms/token, the
frontier marked) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and the checkout importable
    sys.path.insert(0, str(ROOT))


from benchmarks import machine, reporting  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Entry:
    """One model of the comparison: how it is made (`train` overrides of `config`, or a `compress`
    method and its flags applied to the dense workdir)."""

    name: str
    family: str                      # dense | sparse | svd | asvd | cofi | int8
    config: str = ""                 # train: the config file (relative to the checkout)
    overrides: tuple = ()            # train: ("model.ff_sparsity=64", ...)
    compress: tuple = ()             # compress: ("--method=svd", "--keep=0.5", ...)
    source: str = "dense"            # compress: the entry whose workdir is compressed


def entries(args) -> list[Entry]:
    base = "experiments/configs/tiny.py" if args.quick else "experiments/configs/stdlib.py"
    if args.quick:
        sparse = [Entry("sparse_all", "sparse", base, ("model.ff_sparsity=8", "model.attn_sparsity=4",
                                                       "model.loss_sparsity=4"))]
        keeps, sparsities = (0.5,), (0.5,)
    else:
        sparse_preset = "experiments/configs/stdlib_sparse.py"
        sparse = [Entry("sparse_ff", "sparse", base, ("model.ff_sparsity=64", "model.d_ff=1536")),
                  Entry("sparse_ffqkv", "sparse", sparse_preset, ("model.loss_sparsity=0",)),
                  Entry("sparse_all", "sparse", sparse_preset)]
        keeps, sparsities = (0.5, 0.25, 0.1), (0.3, 0.5, 0.7)
    out = [Entry("dense", "dense", base), *sparse]
    for method in ("svd", "asvd"):
        out += [Entry(f"{method}_keep{keep:g}", method, compress=(f"--method={method}", f"--keep={keep}"))
                for keep in keeps]
    out += [Entry(f"cofi_{s:g}", "cofi", compress=("--method=cofi", f"--target_sparsity={s}",
                                                   f"--steps={args.cofi_steps}")) for s in sparsities]
    # int8 weights (docs/quantization.md) of the dense and the sparse_all model, and on top of ASVD: what
    # sparsity or factorisation and int8 give together.
    sources = ("dense", "sparse_all") if args.quick else ("dense", "sparse_all", "asvd_keep0.25")
    out += [Entry(f"{source}_int8", "int8", compress=("--method=int8",), source=source) for source in sources]
    return out


# --------------------------------------------------------------------------------------------
# Making the workdirs (the user's commands)

def _run_cli(argv: list[str], log: pathlib.Path) -> None:
    """`python -m scaling_sparse ARGV`, its output appended to `log`; a failure stops the benchmark
    with the command and the log's tail."""
    cmd = [sys.executable, "-m", "scaling_sparse", *argv]
    print("  $ " + " ".join(cmd[1:]), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"`{' '.join(cmd[1:])}` failed with exit status {done.returncode}:\n{tail}")


def make_workdirs(args, todo: list[Entry], root: pathlib.Path) -> dict:
    """Trains / compresses every entry (skipping finished ones) -> {name: seconds it took here}."""
    seconds = {}
    log = root / "commands.log"
    for entry in todo:
        workdir = root / entry.name
        start = time.perf_counter()
        if entry.config:
            print(f"[{entry.name}] train {args.steps} steps", flush=True)
            _run_cli(["train", f"--config={entry.config}", f"--workdir={workdir}",
                      f"--config.train.num_steps={args.steps}", "--config.train.sample_at_end=False",
                      "--config.train.progress=False", *(f"--config.{o}" for o in entry.overrides)], log)
        elif (workdir / "compression.json").exists():
            print(f"[{entry.name}] kept ({workdir}/compression.json exists)", flush=True)
        else:
            print(f"[{entry.name}] compress", flush=True)
            _run_cli(["compress", f"--workdir={root / entry.source}", f"--out={workdir}", *entry.compress], log)
        seconds[entry.name] = time.perf_counter() - start
    return seconds


# --------------------------------------------------------------------------------------------
# Measuring

def load_entry(workdir: pathlib.Path):
    """(config, graphdef, params, step) of a workdir, from its stored config."""
    from scaling_sparse.checkpoint import load_saved_config
    from scaling_sparse.config import validate
    from scaling_sparse.sharding import single_device_mesh
    from scaling_sparse.train import load_params

    config = validate(load_saved_config(workdir))
    config.mesh.update(data=1, fsdp=1, tensor=1)
    graphdef, params, step = load_params(config, workdir, mesh=single_device_mesh())
    return config, graphdef, params, step


def measure(args, todo: list[Entry], root: pathlib.Path) -> list[dict]:
    from benchmarks.decode_timing import DecodeTimer, run_timers
    from scaling_sparse.decode import Decoder
    from scaling_sparse.params import report_params
    from scaling_sparse.sharding import single_device_mesh
    from scaling_sparse.train import evaluate

    rows, timers = [], []
    for entry in todo:
        workdir = root / entry.name
        config, graphdef, params, step = load_entry(workdir)
        metrics = evaluate(config, workdir, mesh=single_device_mesh())
        report = report_params(config, name=entry.name)
        provenance = json.loads((workdir / "compression.json").read_text()) if entry.compress else {}
        decoder = Decoder(graphdef, params, max_len=config.model.max_len)
        timer = DecodeTimer(decoder, vocab_size=config.model.vocab_size, prompt_len=args.prompt_len,
                            tokens=args.tokens, per_call_tokens=1, seed=0)
        timers.append(timer)
        extra = int(provenance.get("extra_steps", 0))
        rows.append({
            "name": entry.name, "family": entry.family, "workdir": str(workdir),
            "made_by": (["train", entry.config, *entry.overrides] if entry.config else ["compress", *entry.compress]),
            "eval_loss": metrics["eval_loss"], "eval_perplexity": metrics["eval_perplexity"],
            "eval_accuracy": metrics["eval_accuracy"], "eval_tokens": metrics["eval_tokens"],
            "checkpoint_step": step,
            "training_steps": (step if entry.config else int(provenance.get("source_step", 0)) + extra),
            "extra_steps": extra,
            "total_params": report["total_params"], "params_per_token": report["params_per_token"],
            "bytes_per_token": report["bytes_per_token"],
            "compression": provenance})
        print(f"  {entry.name}: eval loss {metrics['eval_loss']:.4f}, {report['params_per_token']:,} parameters "
              f"per token", flush=True)
    print(f"timing {len(timers)} models, {args.repeats} interleaved repeats of {args.tokens} tokens", flush=True)
    run_timers(timers, argparse.Namespace(repeats=args.repeats, per_call_repeats=0))
    for row, timer in zip(rows, timers):
        loop = timer.loop
        row.update({"ms_per_token": statistics.median(loop), "ms_per_token_min": min(loop),
                    "ms_per_token_max": max(loop), "ms_per_token_repeats": loop,
                    "compile_s": timer.compile_s["loop"]})
    dense = next(r for r in rows if r["family"] == "dense")
    for row in rows:
        row["speedup_vs_dense"] = dense["ms_per_token"] / row["ms_per_token"]
        row["params_per_token_ratio"] = dense["params_per_token"] / row["params_per_token"]
        row["bytes_per_token_ratio"] = dense["bytes_per_token"] / row["bytes_per_token"]
        row["eval_loss_vs_dense"] = row["eval_loss"] - dense["eval_loss"]
    mark_frontier(rows)
    return rows


def mark_frontier(rows: list[dict]) -> None:
    """`on_frontier`: no other entry is both faster and lower in validation loss (Pareto-optimal)."""
    for row in rows:
        row["on_frontier"] = not any(o is not row and o["ms_per_token"] <= row["ms_per_token"]
                                     and o["eval_loss"] <= row["eval_loss"]
                                     and (o["ms_per_token"], o["eval_loss"]) != (row["ms_per_token"], row["eval_loss"])
                                     for o in rows)


def best_by_budget(rows: list[dict]) -> list[dict]:
    """For each frontier entry's latency as a budget: the entry with the lowest loss within it."""
    out = []
    for budget in sorted(r["ms_per_token"] for r in rows if r["on_frontier"]):
        within = [r for r in rows if r["ms_per_token"] <= budget]
        best = min(within, key=lambda r: r["eval_loss"])
        out.append({"budget_ms_per_token": budget, "best": best["name"], "family": best["family"],
                    "eval_loss": best["eval_loss"]})
    return out


# --------------------------------------------------------------------------------------------
# Output

def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<20}{'family':<8}{'steps':>7}{'extra':>7}{'params/token':>14}{'bytes x':>8}"
            f"{'eval loss':>11}{'vs dense':>10}{'ms/token':>10}{'speedup':>9}  frontier")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<20}{r['family']:<8}{r['training_steps']:>7}{r['extra_steps']:>7}"
                     f"{r['params_per_token']:>14,}{r['bytes_per_token_ratio']:>8.2f}{r['eval_loss']:>11.4f}"
                     f"{r['eval_loss_vs_dense']:>+10.4f}{r['ms_per_token']:>10.3f}{r['speedup_vs_dense']:>9.2f}"
                     f"  {'*' if r['on_frontier'] else ''}")
    return "\n".join(lines)


COLOURS = {"dense": "black", "sparse": "tab:red", "svd": "tab:blue", "asvd": "tab:green", "cofi": "tab:purple",
           "int8": "tab:orange"}


def plot(rows: list[dict], path, title: str) -> None:
    """Left: validation log-perplexity against CPU ms/token, the frontier as a line. Right: the same
    loss against weight bytes read per token (what bounds memory-bound decoding; int8 reads a byte a weight)."""
    plt = reporting._pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((ax1, "ms_per_token", "CPU decode latency (ms/token, batch 1)"),
                           (ax2, "bytes_per_token", "weight bytes read per decoded token")):
        for family, colour in COLOURS.items():
            mine = sorted((r for r in rows if r["family"] == family), key=lambda r: r[key])
            if not mine:
                continue
            ax.plot([r[key] for r in mine], [r["eval_loss"] for r in mine], "o-" if family in ("svd", "asvd", "cofi")
                    else "o", color=colour, label=family, alpha=0.85)
            for r in mine:
                ax.annotate(r["name"], (r[key], r["eval_loss"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("validation log-perplexity (nats/token)")
        ax.grid(alpha=0.3)
    frontier = sorted((r for r in rows if r["on_frontier"]), key=lambda r: r["ms_per_token"])
    ax1.step([r["ms_per_token"] for r in frontier], [r["eval_loss"] for r in frontier], where="post",
             color="grey", linestyle="--", label="frontier")
    ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="workdirs/compare_methods", help="where the workdirs are made (reused)")
    p.add_argument("--steps", type=int, default=None, help="training steps of dense and sparse (300; quick 20)")
    p.add_argument("--cofi_steps", type=int, default=None, help="CoFi's pruning steps (150; quick 4)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per timed loop (64; quick 8)")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed repeats (7; quick 2)")
    p.add_argument("--only", default="", help="comma-separated entry names (default: all)")
    p.add_argument("--quick", action="store_true", help="the tiny preset, one point per method (tests)")
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    defaults = dict(steps=(20, 300), cofi_steps=(4, 150), tokens=(8, 64), repeats=(2, 7))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("steps", "cofi_steps", "tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    todo = entries(args)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {e.name for e in todo}
        if unknown:
            raise SystemExit(f"--only names unknown entries {sorted(unknown)}; known: {[e.name for e in todo]}")
        todo = [e for e in todo if e.name in wanted or e.family == "dense"]  # dense: the reference row
    root = pathlib.Path(args.root)
    if not root.is_absolute():
        root = ROOT / root
    root.mkdir(parents=True, exist_ok=True)
    info = machine.machine_info()
    make_s = make_workdirs(args, todo, root)
    rows = measure(args, todo, root)
    for row in rows:
        row["made_in_s"] = make_s[row["name"]]
    backend = machine.machine_kind()
    stem = f"compression_{backend}" + ("_quick" if args.quick else "")
    result = {**reporting.run_header("compare_methods", info),
              "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "results": rows, "best_by_latency_budget": best_by_budget(rows)}
    print(format_table(rows))
    out_dir = pathlib.Path(args.out_dir)
    reporting.write_json(out_dir / f"{stem}.json", result)
    plot(rows, out_dir / f"{stem}.png", f"Quality vs CPU decode latency ({'tiny' if args.quick else 'stdlib'} "
         f"size, {args.steps} training steps; {info['cpu_count']} {backend} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
