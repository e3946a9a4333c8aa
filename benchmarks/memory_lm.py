"""TRIME against cross-entropy, a continuous cache and kNN-LM, for a dense and a sparse model (issue 32;
docs/trime.md).

Per model (stdlib dense, stdlib_sparse) and seed, four training runs with the project's own commands
(subprocesses, equal steps and tokens): CE, TrimeLM (memory local), TrimeLM_long (memory long,
consecutive-segment batches) and TrimeLM_ext (memory ext, BM25 batches); datastores (`datastore`) for the
CE and the ext model. Then, in this process, six evaluations on the same validation batches:
  CE            the CE model, no memory
  CE + cache    the CE model with the window's earlier tokens as memory (the continuous cache)
  TrimeLM       the local model with local memory
  TrimeLM_long  the long model with every earlier token of the batch (consecutive validation windows) and
                a FIFO of the last --fifo scored tokens of earlier batches
  kNN-LM        the CE model + its datastore, p = (1 - lambda) p_LM + lambda p_kNN
  TrimeLM_ext   the ext model + its datastore, neighbours in the joint softmax with local memory
Memory temperatures are swept over --temperatures on the validation batches and the best is reported
(tuned on the split it reports: the paper tuned on validation and reported test). Reported: perplexity,
perplexity by the target's training frequency (frequent: the types of the first 50% of training tokens,
mid: the next 40%, rare: the last 10%), evaluation tokens/s with and without the datastore, datastore
size and build time, the seed spread. JSON under benchmarks/results/, a table, a plot. Scoring runs on
the host (NumPy, and eager JAX for the in-batch memory): the tokens/s compare the variants' costs, not a
tuned evaluation server.

    python benchmarks/memory_lm.py                         # stdlib size, 2 seeds (hours on 2 cores)
    python benchmarks/memory_lm.py --path=DIR              # any folder of text files
    python benchmarks/memory_lm.py --quick                 # the tiny preset, 1 seed (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and the checkout importable
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks import machine, reporting  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = {"ce": (), "local": ("train.objective=trime", "train.trime.memory=local"),
        "long": ("train.objective=trime", "train.trime.memory=long"),
        "ext": ("train.objective=trime", "train.trime.memory=ext")}
# variant -> (training run, evaluation memory, datastore)
VARIANTS = {"CE": ("ce", "none", False), "CE + cache": ("ce", "local", False), "TrimeLM": ("local", "local", False),
            "TrimeLM_long": ("long", "long", False), "kNN-LM": ("ce", "none", True),
            "TrimeLM_ext": ("ext", "local", True)}


def run_cli(argv: list[str], log: pathlib.Path) -> float:
    """`python -m scaling_sparse ARGV` (output appended to log) -> seconds; a failure stops the benchmark."""
    cmd = [sys.executable, "-m", "scaling_sparse", *argv]
    print("  $ " + " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"`{' '.join(cmd[2:])}` failed ({done.returncode}):\n" +
                         "\n".join(log.read_text().splitlines()[-20:]))
    return time.perf_counter() - start


def seed_data_cache(root: pathlib.Path, workdir: pathlib.Path) -> None:
    """Before a workdir's first run: a copy of the token caches (and TrimeLM_ext's BM25 grouping, ~10 min on 2
    cores at the stdlib size) that an earlier run of this benchmark built. They are keyed by the corpus and the
    tokenizer (data/cache.py, data/local.py), so a run whose tokenizer differs ignores them and builds its own."""
    if workdir.exists():
        return
    caches = sorted(root.glob("*/data_cache"), key=lambda d: -sum(1 for _ in d.iterdir()))
    if caches:
        shutil.copytree(caches[0], workdir / "data_cache")


def frequency_buckets(stream: np.ndarray, vocab: int) -> np.ndarray:
    """token id -> 0 frequent, 1 mid, 2 rare (by the share of training tokens its type's rank covers)."""
    counts = np.bincount(stream.astype(np.int64), minlength=vocab)
    order = np.argsort(-counts, kind="stable")
    covered = np.cumsum(counts[order]) / max(counts.sum(), 1)
    before = np.concatenate([[0.0], covered[:-1]])  # the share of tokens before this type
    bucket = np.full(vocab, 2, np.int64)
    bucket[order[before < 0.9]] = 1
    bucket[order[before < 0.5]] = 0
    return bucket


class Evaluator:
    """One workdir's validation pass (features included) and its scores under each memory."""

    def __init__(self, workdir: pathlib.Path):
        import jax
        from flax import nnx

        from scaling_sparse.checkpoint import load_saved_config
        from scaling_sparse.config import validate
        from scaling_sparse.sharding import single_device_mesh
        from scaling_sparse.train import load_data, load_params

        self.workdir = workdir
        self.config = validate(load_saved_config(workdir))
        self.config.mesh.update(data=1, fsdp=1, tensor=1)
        graphdef, params, self.step = load_params(self.config, workdir, mesh=single_device_mesh())
        self.data = load_data(self.config, workdir)
        forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, features=True))
        forward(params, self.data.eval_batches[0]["inputs"])  # compiled before the timed pass
        start = time.perf_counter()
        self.outputs = [tuple(np.asarray(a, np.float32) for a in forward(params, b["inputs"]))
                        for b in self.data.eval_batches]
        self.forward_seconds = time.perf_counter() - start
        self.searches = None

    def search(self, k: int):
        """The datastore's neighbours of every validation token (once; independent of the temperatures)."""
        from scaling_sparse import datastore

        store = datastore.Datastore(self.workdir, self.step)
        start = time.perf_counter()
        self.searches = [store.search(g.reshape(-1, g.shape[-1]), k) for _, g in self.outputs]
        self.search_seconds = time.perf_counter() - start
        return store.meta

    def token_losses(self, memory: str, temperature: float, knn: dict | None, fifo: int = 0):
        """-> (losses, targets) of the real validation tokens, and the scoring seconds. fifo: TrimeLM_long's
        FIFO of the last `fifo` scored tokens carried across batches (memory_eval.py)."""
        import jax.numpy as jnp

        from scaling_sparse.datastore import knn_token_losses
        from scaling_sparse.memory_eval import fifo_token_losses
        from scaling_sparse.trime_loss import trime_token_losses

        losses, targets, start = [], [], time.perf_counter()
        d = self.outputs[0][1].shape[-1]
        keys, labels, valid = np.zeros((fifo, d), np.float32), np.zeros(fifo, np.int32), np.zeros(fifo, bool)
        for i, (batch, (logits, g)) in enumerate(zip(self.data.eval_batches, self.outputs)):
            t, w = batch["targets"], batch["weights"]
            if fifo and knn is None and memory != "none":
                loss = np.asarray(fifo_token_losses(jnp.asarray(logits), jnp.asarray(g), jnp.asarray(t), jnp.asarray(w),
                                                    memory, temperature, jnp.asarray(keys), jnp.asarray(labels),
                                                    jnp.asarray(valid)))
                keys = np.concatenate([keys, g.reshape(-1, d)])[-fifo:]
                labels = np.concatenate([labels, t.reshape(-1)])[-fifo:]
                valid = np.concatenate([valid, w.reshape(-1) > 0])[-fifo:]
            elif knn is not None:
                scores, values = self.searches[i]
                loss = knn_token_losses(logits, g, t, w, scores, values, memory=memory, temperature=temperature,
                                        knn_lambda=knn["lambda"], knn_temperature=knn["temperature"])
            elif memory == "none":
                top = logits.max(-1, keepdims=True).astype(np.float64)
                lse = top + np.log(np.exp(logits - top).sum(-1, keepdims=True))
                loss = (lse - np.take_along_axis(logits, t[..., None], -1))[..., 0]
            else:
                loss = np.asarray(trime_token_losses(jnp.asarray(logits), jnp.asarray(g), jnp.asarray(t),
                                                     jnp.asarray(w), memory, temperature=temperature,
                                                     group_rows=t.shape[0]))
            losses.append(loss[w > 0])
            targets.append(t[w > 0])
        return np.concatenate(losses), np.concatenate(targets), time.perf_counter() - start


def score(evaluator: Evaluator, memory: str, temperatures, knn, buckets, fifo: int = 0, knn_lambdas=()) -> dict:
    """The best row over the memory temperatures (and, with a datastore, the kNN lambdas)."""
    best, fastest = None, float("inf")
    taus = temperatures if memory != "none" else (1.0,)  # kNN-LM and CE have no memory temperature
    settings = [(tau, lam) for tau in taus for lam in (knn_lambdas if knn is not None else (None,))]
    for tau, lam in settings:
        losses, targets, seconds = evaluator.token_losses(memory, tau, knn and {**knn, "lambda": lam}, fifo)
        fastest = min(fastest, seconds)  # the first pass of an eager jnp scoring compiles its ops
        row = {"temperature": tau, "knn_lambda": lam, "loss": float(losses.mean()), "perplexity": float(np.exp(losses.mean())),
               "tokens": int(len(losses)), "scoring_seconds": seconds}
        for name, b in (("frequent", 0), ("mid", 1), ("rare", 2)):
            sel = buckets[targets] == b
            row[f"perplexity_{name}"] = float(np.exp(losses[sel].mean())) if sel.any() else None
            row[f"tokens_{name}"] = int(sel.sum())
        if best is None or row["loss"] < best["loss"]:
            best = row
    best["scoring_seconds"] = fastest
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny preset, 1 seed, few steps (a smoke test)")
    p.add_argument("--path", default="", help="a folder of text files (default: the embedded stdlib corpus)")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    # wide: a CE model's features were never trained as keys (its best cache temperature can be far above 1)
    # Down to 0.1: at the stdlib size the best CE + cache temperature was the lowest of two narrower sweeps (1.0,
    # then 0.5): a CE model's features were never trained as keys.
    p.add_argument("--temperatures", default="0.1,0.2,0.3,0.5,0.7,1.0,1.5,2,3")
    p.add_argument("--fifo", type=int, default=12288, help="TrimeLM_long's evaluation FIFO in tokens (the paper's)")
    p.add_argument("--knn_k", type=int, default=1024)
    p.add_argument("--knn_lambdas", default="0.05,0.1,0.2,0.3,0.5",
                   help="kNN interpolation weights swept on validation (kNN-LM and TrimeLM_ext), the best reported")
    p.add_argument("--knn_temperature", type=float, default=10.5)
    p.add_argument("--datastore_tokens", type=int, default=None,
                   help="training tokens in each datastore (default 1M; --quick 20k): the whole stdlib stream (~10M "
                        "tokens, ~5 GB of float16 keys) takes ~20 min a store on 2 cores")
    p.add_argument("--models", default="dense,sparse",
                   help="which models to run (stdlib size): the rows of the others are kept from the JSON at --out "
                        "when it was made with the same settings (each kept row names the run it came from)")
    p.add_argument("--root", default=str(ROOT / "workdirs" / "memory_lm"))
    p.add_argument("--out", default=str(RESULTS / f"memory_lm_{machine.machine_kind('cpu')}"))
    args = p.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 2)
    steps = args.steps or (30 if args.quick else 300)
    temperatures = tuple(float(t) for t in args.temperatures.split(","))
    models = ({"dense": "experiments/configs/tiny.py"} if args.quick else
              {"dense": "experiments/configs/stdlib.py", "sparse": "experiments/configs/stdlib_sparse.py"})
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.quick:
        chosen = ["dense"]
    unknown = sorted(set(chosen) - set(models))
    if unknown or not chosen:
        p.error(f"--models={args.models}: choose from {','.join(models)} (comma-separated)")
    data_flags = ["--config.data.source=files", f"--config.data.path={args.path}"] if args.path else []
    store_tokens = args.datastore_tokens or (20_000 if args.quick else 1_000_000)
    knn_lambdas = tuple(float(x) for x in args.knn_lambdas.split(","))
    root = pathlib.Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "commands.log"
    knn = {"temperature": args.knn_temperature}
    out = pathlib.Path(args.out)
    # Finished steps are kept: a rerun with the same --root resumes (training resumes from its checkpoint, a
    # built datastore and its recorded build time are reused), and the JSON is rewritten after each seed.
    timings_path = root / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    settings = dict(steps=steps, seeds=seeds, temperatures=temperatures,
                    knn={"k": args.knn_k, "lambdas": knn_lambdas, **knn}, fifo=args.fifo,
                    data=args.path or "stdlib", datastore_tokens=store_tokens)
    results, carried, carried_timings = _carried_rows(out, [m for m in models if m not in chosen], settings)
    for name, seconds in carried_timings.items():
        timings.setdefault(name, seconds)
    if carried:
        settings["carried"] = carried
    for model, config in ((m, models[m]) for m in chosen):
        for seed in range(seeds):
            dirs = {run: root / f"{model}-s{seed}-{run}" for run in RUNS}
            for run, overrides in RUNS.items():
                print(f"[{model} seed {seed}] train {run}", flush=True)
                seed_data_cache(root, dirs[run])
                seconds = run_cli(
                    ["train", f"--config={config}", f"--workdir={dirs[run]}", f"--config.train.num_steps={steps}",
                     f"--config.train.seed={seed}", "--config.train.sample_at_end=False",
                     "--config.train.progress=False", *data_flags, *(f"--config.{o}" for o in overrides)], log)
                timings.setdefault(f"{model}/{seed}/{run}/train", seconds)  # a resumed run keeps the first's time
                timings_path.write_text(json.dumps(timings, indent=1))
            stores = {}
            for run in ("ce", "ext"):
                name = f"{model}/{seed}/{run}/datastore"
                if name not in timings or not (dirs[run] / "datastore").exists():
                    print(f"[{model} seed {seed}] datastore of {run}", flush=True)
                    timings[name] = run_cli(["datastore", f"--workdir={dirs[run]}",
                                             f"--datastore_tokens={store_tokens}"], log)
                    timings_path.write_text(json.dumps(timings, indent=1))
                size = sum(f.stat().st_size for f in (dirs[run] / "datastore").iterdir())
                stores[run] = {"build_seconds": timings[name], "bytes": size}
            evaluators = {run: Evaluator(dirs[run]) for run in RUNS}
            stream = getattr(evaluators["ce"].data.train, "stream", None)
            buckets = frequency_buckets(stream, evaluators["ce"].config.model.vocab_size)
            for run in ("ce", "ext"):
                stores[run]["meta"] = evaluators[run].search(args.knn_k)
            for variant, (run, memory, uses_store) in VARIANTS.items():
                ev = evaluators[run]
                row = score(ev, memory, temperatures, knn if uses_store else None, buckets,
                            fifo=args.fifo if variant == "TrimeLM_long" else 0, knn_lambdas=knn_lambdas)
                seconds = ev.forward_seconds + row["scoring_seconds"] + (ev.search_seconds if uses_store else 0.0)
                row.update(model=model, seed=seed, variant=variant, tokens_per_s=row["tokens"] / seconds,
                           datastore=stores[run] if uses_store else None)
                print(f"  {model} s{seed} {variant:13s} perplexity {row['perplexity']:8.3f} (tau {row['temperature']:g}) "
                      f"rare {row['perplexity_rare'] or float('nan'):8.2f} | {row['tokens_per_s']:9.0f} tok/s", flush=True)
                results.append(row)
            result = _write(out, results, timings, **settings)
    summary = result["summary"]
    print(f"\n{'model/variant':28s}{'perplexity':>12s}{'spread':>9s}")
    for name, s in summary.items():
        print(f"{name:28s}{s['mean']:12.3f}{s['spread']:9.3f}")
    _plot(result, out.with_suffix(".png"))
    return result


def _carried_rows(out: pathlib.Path, models: list, settings: dict) -> tuple[list, dict, dict]:
    """The rows of `models` (those not run now) from the earlier JSON at `out` -> (rows, {model: the run they
    came from}, that run's timings of them). Kept only when that run used the same settings (a
    comparison across settings would not be one); each kept row names its run's time."""
    path = out.with_suffix(".json")
    if not models or not path.exists():
        return [], {}, {}
    earlier = json.loads(path.read_text())
    differing = [k for k, v in json.loads(json.dumps(settings)).items() if earlier.get(k) != v]
    if differing:
        print(f"warning: {path} was made with other settings ({', '.join(differing)}): its rows of "
              f"{', '.join(models)} are not kept", file=sys.stderr)
        return [], {}, {}
    rows, carried, timings = [], {}, {}
    for model in models:
        kept = [dict(r, from_run=r.get("from_run", earlier["time_utc"])) for r in earlier["results"]
                if r["model"] == model]
        if kept:
            rows += kept
            carried[model] = {"time_utc": kept[0]["from_run"], "machine": earlier.get("machine")}
            timings.update({k: v for k, v in earlier.get("timings", {}).items() if k.startswith(f"{model}/")})
    return rows, carried, timings


def _write(out: pathlib.Path, results: list, timings: dict, **settings) -> dict:
    """The JSON of the rows so far (rewritten after each model and seed: a cut-off run keeps its seeds)."""
    summary = {}
    for model in dict.fromkeys(r["model"] for r in results):
        for variant in VARIANTS:
            ppl = [r["perplexity"] for r in results if r["model"] == model and r["variant"] == variant]
            summary[f"{model}/{variant}"] = {"mean": statistics.mean(ppl), "spread": max(ppl) - min(ppl), "seeds": ppl}
    result = {**reporting.run_header("memory_lm"), **settings, "results": results, "summary": summary,
              "timings": timings}
    reporting.write_json(out.with_suffix(".json"), result)
    return result


def _plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in result["results"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        names = list(VARIANTS)
        means = [result["summary"][f"{model}/{v}"]["mean"] for v in names]
        spreads = [result["summary"][f"{model}/{v}"]["spread"] / 2 for v in names]
        ax.bar(range(len(names)), means, yerr=spreads, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("validation perplexity")
        ax.set_ylim(min(means) * 0.95, max(means) * 1.03)
        ran = len({r["seed"] for r in result["results"] if r["model"] == model})  # a run cut short has fewer
        ax.set_title(f"{model} ({result['steps']} steps, {ran} of {result['seeds']} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
