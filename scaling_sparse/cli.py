"""scaling-sparse: train, evaluate and sample sparse (or dense) decoder LMs.

Usage:
  python -m scaling_sparse train    --config=CONFIG.py --workdir=DIR [--config.FIELD=VALUE ...] [--step=N]
  python -m scaling_sparse eval     --config=CONFIG.py --workdir=DIR [--json] [--step=N]
  python -m scaling_sparse generate --config=CONFIG.py --workdir=DIR --prompt="TEXT"
                                    [--max_new_tokens=N] [--temperature=T] [--top_k=K] [--seed=S] [--step=N]
  python -m scaling_sparse params   --config=CONFIG.py [--json]
  python -m scaling_sparse config   --config=CONFIG.py [--config.FIELD=VALUE ...] [--json]
  python -m scaling_sparse compress --workdir=TRAINED --out=NEW --method=svd|asvd (--rank=R | --keep=F)
                                    [--calibration_batches=N]  |  --method=cofi [--target_sparsity=S] [--steps=N]
  With --workdir and no --config, every command uses the config stored in WORKDIR/config.json (the
  run's own); --config.FIELD=VALUE overrides still apply.
  Several processes (one per host): add --coordinator_address=HOST:PORT --num_processes=N --process_id=I
  (none of them under SLURM or on a multi-host TPU VM: JAX detects the cluster). A process that never
  joins, or dies, ends the others with one message after --distributed_init_timeout=300 or
  --distributed_heartbeat_timeout=100 seconds (docs/reliability.md: what every failure prints).

Commands:
  train     Train from scratch, or resume from the latest checkpoint in DIR (--step=N: from checkpoint
            N). Writes DIR/config.json, DIR/metrics.jsonl (one JSON object per logged step),
            TensorBoard events in DIR/tensorboard and orbax checkpoints in DIR/checkpoints. SIGTERM or
            Ctrl-C saves a checkpoint before exiting; running the same command again resumes with the
            same batches.
  eval      Validation loss (= log-perplexity, nats per token), perplexity and token accuracy of the
            latest checkpoint in DIR (--step=N: of checkpoint N). --memory=local|long: with TRIME's
            in-batch memory, any model (a cross-entropy one: the continuous-cache baseline),
            --memory_temperature=1.0,1.1,1.2 a sweep, --memory_fifo=N earlier batches' keys; --datastore adds the training set's nearest keys
            (--memory=local: TrimeLM_ext, none: kNN-LM) (docs/trime.md).
  datastore Keys (the last block's pre-FFN LayerNorm output, float16) and next tokens of the training
            split into DIR/datastore with a faiss index, for eval --datastore (docs/trime.md).
  generate  Continue --prompt with the latest checkpoint: greedy (--temperature=0) or sampled with a
            temperature and optionally top-k; the defaults are the config's generate section (greedy for
            most presets, temperature 0.7 and top-k 40 for the stdlib demo presets). The whole loop runs jitted with a
            KV cache. --max_new_tokens defaults to as many as fit in model.max_len, at most 64.
  params    Parameter counts: total and read per decoded token, per component (no weights built).
  compress  Make a smaller model from a trained dense one (docs/compression.md): SVD or activation-aware
            SVD factorisation of every attention and FFN matrix (--keep: fraction of each matrix's parameters,
            or --rank), or CoFi structured pruning with distillation to --target_sparsity in --steps steps.
            Writes NEW as an ordinary workdir (eval, generate, params, train take it without --config).
  config    Every config field with its value (after the --config.FIELD overrides), by section, with
            its meaning and the base default where the preset changes it: the list of what
            --config.SECTION.FIELD=VALUE can set.

Devices: --config.mesh.data=N --config.mesh.fsdp=N --config.mesh.tensor=N shape the device mesh
(-1 = all devices left; default: every device on data).

Every config field can be overridden on the command line, e.g.
  --config.train.num_steps=500 --config.model.ff_sparsity=64 --config.model.attn_sparsity=16
  --config.model.loss_sparsity=4 --config.data.source=files --config.data.path=DIR
List them all, with their values: python -m scaling_sparse config --config=experiments/configs/stdlib.py
Configs live in experiments/configs/ (tiny.py, stdlib.py, medium_dense.py, ...).
Invalid settings stop at start-up with a message naming the field and the fix (exit status 2).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from scaling_sparse.process_watch import DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_INIT_TIMEOUT_S

COMMANDS = ("train", "eval", "generate", "params", "config", "compress", "datastore")
# Python loggers held at WARNING unless --verbosity is given (main()).
QUIET_LOGGERS = ("absl", "jax")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. experiments/configs/stdlib.py; override fields with --config.a.b=v "
    "(`python -m scaling_sparse config --config=FILE` lists every field).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer, data cache.")
_PROMPT = flags.DEFINE_string("prompt", None, "generate: the text to continue.")
DEFAULT_MAX_NEW_TOKENS = 64
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None,
                                "generate: number of tokens to generate. Default: as many as fit in "
                                f"model.max_len after the prompt, at most {DEFAULT_MAX_NEW_TOKENS}.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", None, "generate: sampling temperature; 0 = greedy. Default: config.generate.temperature.")
_TOP_K = flags.DEFINE_integer("top_k", None, "generate: sample among the k most likely tokens; 0 = all. "
                              "Default: config.generate.top_k.")
_SEED = flags.DEFINE_integer("seed", None, "generate: sampling seed. Default: config.generate.seed.")
_MEMORY = flags.DEFINE_enum("memory", "none", ["none", "local", "long", "ext"],
                            "eval: with TRIME's in-batch memory (docs/trime.md): local (the window's earlier tokens), "
                            "long (every earlier token of the batch's consecutive windows); none = plain "
                            "cross-entropy. With --datastore: local = TrimeLM_ext, none = kNN-LM. (ext is a "
                            "training memory: refused here, it would see later text.)")
_MEMORY_TEMPERATURE = flags.DEFINE_list("memory_temperature", ["1.0"],
                                        "eval --memory: the memory scores' temperature; several (1.0,1.1,1.2) "
                                        "= a sweep, the best reported.")
_MEMORY_FIFO = flags.DEFINE_integer("memory_fifo", 0, "eval --memory=local|long: also the keys of the last N scored "
                                    "tokens, carried across evaluation batches (TrimeLM_long's FIFO; 0 = none).")
_DATASTORE = flags.DEFINE_bool("datastore", False, "eval: add the neighbours from WORKDIR/datastore (build it with "
                               "the datastore command): --memory=local is TrimeLM_ext, --memory=none kNN-LM.")
_KNN_K = flags.DEFINE_integer("knn_k", 1024, "eval --datastore: neighbours per token.")
_KNN_LAMBDA = flags.DEFINE_float("knn_lambda", 0.3, "eval --datastore: weight of the kNN distribution.")
_KNN_TEMPERATURE = flags.DEFINE_float("knn_temperature", 10.5, "eval --datastore: temperature of the kNN distribution.")
_DATASTORE_TOKENS = flags.DEFINE_integer("datastore_tokens", 0, "datastore: at most this many training tokens "
                                         "(0 = the whole training split of a local corpus; required for TFDS).")
_JSON = flags.DEFINE_bool("json", False, "eval, params, config: print JSON instead of text.")
_STEP = flags.DEFINE_integer("step", None, "train: the checkpoint step to resume from; eval, generate: the "
                             "checkpoint step to load (default: the latest).")
# compress (scaling_sparse/compress/).
_OUT = flags.DEFINE_string("out", None, "compress: the new workdir for the compressed model (must not exist).")
_METHOD = flags.DEFINE_enum("method", None, ["svd", "asvd", "cofi", "int8"], "compress: svd | asvd | cofi | int8.")
_WEIGHTS = flags.DEFINE_enum("weights", None, ["float", "int8"], "eval, generate: the weights to run with; int8 = "
                             "symmetric int8 with a float32 scale per row, quantised at load (docs/quantization.md). "
                             "Default: as the checkpoint holds them.")
_RANK = flags.DEFINE_integer("rank", None, "compress svd/asvd: the rank of every factor pair.")
_KEEP = flags.DEFINE_float("keep", None, "compress svd/asvd: the fraction of each matrix's parameters kept (0..1].")
_TARGET = flags.DEFINE_float("target_sparsity", 0.5, "compress cofi: the fraction of attention and FFN "
                             "parameters to prune.")
_STEPS = flags.DEFINE_integer("steps", 200, "compress cofi: pruning (distillation) steps.")
_CALIBRATION = flags.DEFINE_integer("calibration_batches", 8, "compress asvd: training batches for the "
                                    "activation statistics.")
# Multi-process runs (scaling_sparse/distributed.py): all three, or none under SLURM / on a TPU VM slice.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0's coordinator, for a run of several processes.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run (0..N-1).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_init_timeout", DEFAULT_INIT_TIMEOUT_S, "Multi-process runs: seconds to wait for every process to join before "
    "giving up with a message naming the missing one (JAX's initialization_timeout).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "distributed_heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT_S, "Multi-process runs: seconds without a heartbeat after which a process "
    "counts as dead and the run stops (JAX's heartbeat_timeout_seconds).")

EXIT_USAGE = 2  # bad config, flags or prompt
EXIT_FAILURE = 1  # e.g. no checkpoint to load


class UsageError(Exception):
    """A bad command line (not a config field): printed as `error: ...` without a traceback."""


def _config():
    from scaling_sparse.config import validate

    config = _CONFIG.value
    if config is None:
        raise UsageError("--config is required, e.g. --config=experiments/configs/stdlib.py (or give the "
                         "--workdir of a training run without --config to use the config stored there)")
    try:
        config.model  # config_flags defers a failed load to the first access
    except OSError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UsageError(f"--config could not be loaded ({first}). Fix: give a config file such as "
                         "experiments/configs/stdlib.py") from None
    return validate(config)


def _workdir() -> str:
    if not _WORKDIR.value:
        raise UsageError("--workdir is required: the run directory holding checkpoints (e.g. --workdir=workdirs/demo)")
    if pathlib.Path(_WORKDIR.value).exists() and not pathlib.Path(_WORKDIR.value).is_dir():
        raise UsageError(f"--workdir={_WORKDIR.value} is a file, not a directory. Fix: give the run's directory (a "
                         "new one for a new run)")
    return _WORKDIR.value


def _check_object_store(command: str, workdir: str) -> None:
    """train, eval and generate take a gs:// work directory (docs/storage.md); compress and the datastore
    (memory-mapped, assembled in a folder then renamed) need one on local disk."""
    from scaling_sparse import storage

    local_only = command in ("compress", "datastore") or (command == "eval" and _DATASTORE.value)
    for flag, path in (("--workdir", workdir), ("--out", _OUT.value if command == "compress" else None)):
        if path and storage.is_object_store(path):
            storage.path(path)  # s3:// stops here with its own message
            if local_only:
                what = f"{command} --datastore" if command == "eval" else command
                raise UsageError(f"{flag}={path}: {what} works on a local work directory only (docs/storage.md, "
                                 "\"Not done\"). Fix: copy the work directory to local disk (gcloud storage cp -r "
                                 f"{path} ./local_copy) and give that path")


def cmd_train(config, workdir) -> int:
    from scaling_sparse.train import train

    summary = train(config, workdir, step=_STEP.value)
    if summary.get("interrupted"):
        if summary.get("saved_step") is not None:
            kept = f"checkpoint saved at step {summary['saved_step']}"
        elif summary.get("last_checkpoint") is not None:
            kept = f"before its first step; no new checkpoint, the latest is still step {summary['last_checkpoint']}"
        else:
            kept = "before its first step; no checkpoint saved"
        print(f"stopped by {_signal_name(summary['signal'])} at step {summary['step']} ({kept}); run the same "
              "command again to resume", file=sys.stderr)
        return 128 + int(summary["signal"])
    return 0


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def cmd_eval(config, workdir) -> int:
    from scaling_sparse.train import evaluate

    try:
        temperatures = tuple(float(t) for t in _MEMORY_TEMPERATURE.value)
    except ValueError:
        raise UsageError(f"--memory_temperature must be numbers, got {','.join(_MEMORY_TEMPERATURE.value)}") from None
    if _DATASTORE.value:
        from scaling_sparse import datastore

        if len(temperatures) > 1:
            raise UsageError("eval --datastore takes one --memory_temperature")
        if _WEIGHTS.value:
            raise UsageError("eval --datastore --weights: the datastore's keys are the checkpoint's own features. Fix: "
                             "make an int8 workdir (compress --method=int8), build its datastore and evaluate that")
        metrics = datastore.evaluate(config, workdir, step=_STEP.value, memory=_MEMORY.value, temperature=temperatures[0],
                                     k=_KNN_K.value, knn_lambda=_KNN_LAMBDA.value, knn_temperature=_KNN_TEMPERATURE.value)
        print(json.dumps(metrics) if _JSON.value else
              f"step {metrics['step']} | eval_loss (log-perplexity) {metrics['eval_loss']:.4f} | perplexity "
              f"{metrics['eval_perplexity']:.2f} | {metrics['eval_tokens']} tokens | "
              f"{'kNN-LM' if metrics['memory'] == 'none' else 'TrimeLM_ext, memory ' + metrics['memory']} with {metrics['datastore']['count']} keys "
              f"(k {_KNN_K.value}, lambda {_KNN_LAMBDA.value:g})")
        return 0
    metrics = evaluate(config, workdir, step=_STEP.value, memory=_MEMORY.value, temperatures=temperatures,
                       fifo=_MEMORY_FIFO.value, weights=_WEIGHTS.value)
    if _JSON.value:
        print(json.dumps(metrics))
        return 0
    for row in metrics.get("memory_sweep", []) if len(temperatures) > 1 else []:
        print(f"memory {metrics['memory']} temperature {row['temperature']:g}: eval_loss {row['eval_loss']:.4f} | "
              f"perplexity {row['eval_perplexity']:.2f}")
    memory = (f" | memory {metrics['memory']} (temperature {metrics['memory_temperature']:g})"
              if "memory" in metrics else "")
    print(f"step {metrics['step']} | eval_loss (log-perplexity) {metrics['eval_loss']:.4f} | "
          f"perplexity {metrics['eval_perplexity']:.2f} | accuracy {metrics['eval_accuracy']:.4f} | "
          f"{metrics['eval_tokens']} tokens{memory}")
    return 0


def cmd_datastore(config, workdir) -> int:
    from scaling_sparse import datastore

    if _DATASTORE_TOKENS.value < 0:
        raise UsageError(f"--datastore_tokens must be >= 0, got {_DATASTORE_TOKENS.value}")
    datastore.build(config, workdir, step=_STEP.value, max_tokens=_DATASTORE_TOKENS.value)
    return 0


def cmd_generate(config, workdir) -> int:
    from scaling_sparse.data.tokenizer import get_tokenizer
    from scaling_sparse.decode import Decoder, check_request, describe_sampling
    from scaling_sparse.quantize import has_int8
    from scaling_sparse.sharding import make_mesh
    from scaling_sparse.train import load_params

    g = config.generate
    temperature = g.temperature if _TEMPERATURE.value is None else _TEMPERATURE.value
    top_k = g.top_k if _TOP_K.value is None else _TOP_K.value
    seed = g.seed if _SEED.value is None else _SEED.value
    prompt = _PROMPT.value
    if not 0 <= temperature < float("inf"):  # also NaN
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 <= top_k <= config.model.vocab_size:
        raise UsageError(f"--top_k must be in 0..vocab_size={config.model.vocab_size} (0 = off), got {top_k}")
    if not prompt:
        raise UsageError('the prompt is empty: give the text to continue with --prompt="..."')
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 arrive as lone surrogates
        raise UsageError(f"--prompt is not valid UTF-8 text (a byte that is not UTF-8 at character {e.start}). "
                         "Fix: give the prompt in UTF-8 (the encoding the model's text was read in)") from None
    if not 0 <= seed < 2**63:
        raise UsageError(f"--seed must be an integer in [0, 2**63), got {seed}")
    tokenizer = get_tokenizer(config, workdir)
    encdec = config.model.arch == "encdec"
    if encdec:  # the prompt is the encoder's input, eos-terminated as the training inputs are
        ids = tokenizer.encode(prompt) + [tokenizer.eos_id]
    else:  # documents are packed after an eos in training, so eos + prompt reads as a document start
        ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    max_new = _MAX_NEW.value
    if max_new is None:  # as many as fit, at most the default (at least 1: a full prompt is an error below)
        room = config.model.max_len if encdec else config.model.max_len - len(ids)
        max_new = max(1, min(DEFAULT_MAX_NEW_TOKENS, room))
        given = f"--max_new_tokens defaulted to {max_new}"
    else:
        given = f"--max_new_tokens={max_new}"
    limit = config.model.max_len if encdec else config.model.max_len - 1
    if len(ids) > limit:  # no --max_new_tokens can make room: say how long a prompt may be
        raise UsageError(f"the prompt is {len(ids)} tokens (with its eos), but this model reads at most {limit} "
                         f"(model.max_len {config.model.max_len}{'' if encdec else ', less one new token'}). Fix: "
                         f"shorten --prompt to about {int(len(prompt) * (limit - 1) / len(ids))} characters, e.g. keep "
                         "its end, the part the continuation depends on")
    try:
        check_request(len(ids), max_new, config.model.max_len, prompt_in_decoder=not encdec)
    except ValueError as e:
        raise UsageError(f"{e} (the prompt counts its eos; {given})") from None
    mesh = make_mesh(config.mesh)
    graphdef, params, _ = load_params(config, workdir, step=_STEP.value, mesh=mesh, weights=_WEIGHTS.value)
    decoder = Decoder(graphdef, params, max_len=config.model.max_len, temperature=temperature, top_k=top_k,
                      mesh=mesh)
    path = "compiled CPU kernels" if decoder.cpu_kernels else "JAX"
    if has_int8(decoder.params):  # the compiled FFN and QKV kernels read float32 weights only
        path = "JAX with int8 weights" + (" (attention: compiled CPU kernel)" if decoder.cpu_kernels else "")
    print(f"# {describe_sampling(temperature, top_k, seed)}; decode path: {path}", file=sys.stderr)
    out = decoder.sample(ids, max_new, seed=seed, eos_id=tokenizer.eos_id)
    # A decoder-only LM continues the prompt; an encoder-decoder writes its own output (for span
    # corruption: each <extra_id_i> of the input followed by the text it predicts for that span).
    print(tokenizer.decode(out) if encdec else prompt + tokenizer.decode(out))
    return 0


def _config_name() -> str:
    """The config file's stem, or the workdir's name when the config is the one stored there."""
    filename = config_flags.get_config_filename(flags.FLAGS["config"])
    if pathlib.Path(filename).name == STORED_CONFIG.name and _WORKDIR.value:
        return pathlib.Path(_WORKDIR.value).name
    return pathlib.Path(filename).stem


def cmd_params(config) -> int:
    from scaling_sparse.params import format_report, report_params

    name = _config_name()
    report = report_params(config, name=name)
    print(json.dumps(report, indent=2) if _JSON.value else format_report(report))
    return 0


def _field_notes() -> dict:
    """{"section.field": its comment in config.py, or ""}, in config.py's order (base_config() and the
    ModelConfig dataclass): the meaning of each field, where config.py gives one."""
    import inspect
    import re

    from scaling_sparse import config as config_module

    notes, sections, in_model = {}, {}, False
    for line in inspect.getsource(config_module).splitlines():
        if line and not line[0].isspace():
            in_model = line.startswith("class ModelConfig")
        alias = re.match(r"\s+(\w+) = c\.(\w+) = ", line)
        if alias:
            sections[alias.group(1)] = alias.group(2)
        field = re.match(r"    (\w+): [^=]+=[^#]*(#\s*(.+))?$", line) if in_model else None
        if field:
            notes[f"model.{field.group(1)}"] = (field.group(3) or "").strip()
        setting = re.match(r"\s+(\w+)\.(\w+) = [^#]*(#\s*(.+))?$", line)
        if setting and setting.group(1) in sections:
            notes[f"{sections[setting.group(1)]}.{setting.group(2)}"] = (setting.group(4) or "").strip()
    return notes


def cmd_config(config) -> int:
    """Every field by section: its value, the base default where it differs, and its meaning."""
    from scaling_sparse.config import base_config

    values = config.to_dict()
    if _JSON.value:
        print(json.dumps(values, indent=2, default=str))
        return 0
    defaults, notes = base_config().to_dict(), _field_notes()
    order = {key: i for i, key in enumerate(notes)}  # config.py's order; fields it lacks go last

    def rank(key):
        return order.get(key, len(order)), key

    name = config_flags.get_config_filename(flags.FLAGS["config"])
    print(f"# {name}, after the command-line overrides. Set any field with --config.SECTION.FIELD=VALUE.")
    def section_rank(section):
        fields = values[section] if isinstance(values[section], dict) else {}
        return min([rank(f"{section}.{f}") for f in fields] or [rank(section)])

    for section in sorted(values, key=section_rank):
        fields = values[section]
        if not isinstance(fields, dict):
            print(f"{section} = {fields!r}")
            continue
        print(f"\n[{section}]")
        width = max(map(len, fields), default=0)
        for field in sorted(fields, key=lambda f: rank(f"{section}.{f}")):
            value, extra = fields[field], []
            base = defaults.get(section, {}).get(field, value)
            if base != value:
                extra.append(f"base default {base!r}")
            if notes.get(f"{section}.{field}"):
                extra.append(notes[f"{section}.{field}"])
            line = f"  {field:<{width}} = {value!r}"
            print(f"{line:<{width + 20}}  # {'; '.join(extra)}" if extra else line)
    return 0


def _check_compress_flags() -> None:
    """compress's flags, before anything is read: each error names the flag and the fix."""
    method = _METHOD.value
    if method is None:
        raise UsageError("compress needs --method=svd | asvd | cofi | int8")
    if not _OUT.value:
        raise UsageError("compress needs --out=NEW: a new directory for the compressed model")
    from scaling_sparse.checkpoint import CheckpointError
    from scaling_sparse.compress.workdir import check_out

    try:  # the same check compress makes, here before any config or checkpoint is read
        check_out(_workdir(), _OUT.value)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    if method in ("svd", "asvd"):
        if (_RANK.value is None) == (_KEEP.value is None):
            raise UsageError(f"--method={method} needs exactly one of --rank=R or --keep=F (e.g. --keep=0.5)")
        if _RANK.value is not None and _RANK.value < 1:
            raise UsageError(f"--rank must be >= 1, got {_RANK.value}")
        if _KEEP.value is not None and not 0.0 < _KEEP.value <= 1.0:
            raise UsageError(f"--keep must be in (0, 1] (the fraction of each matrix's parameters), got {_KEEP.value}")
        if _CALIBRATION.value < 1:
            raise UsageError(f"--calibration_batches must be >= 1, got {_CALIBRATION.value}")
    elif method == "int8":
        if _RANK.value is not None or _KEEP.value is not None:
            raise UsageError("--rank and --keep are for svd / asvd; int8 takes no settings")
    else:
        if _RANK.value is not None or _KEEP.value is not None:
            raise UsageError("--rank and --keep are for svd / asvd; cofi takes --target_sparsity and --steps")
        if not 0.0 <= _TARGET.value < 1.0:
            raise UsageError(f"--target_sparsity must be in [0, 1), got {_TARGET.value}")
        if _STEPS.value < 1:
            raise UsageError(f"--steps must be >= 1, got {_STEPS.value}")


def cmd_compress(config, workdir) -> int:
    from scaling_sparse.compress import run_compress

    summary = run_compress(config, workdir, _OUT.value, method=_METHOD.value, rank=_RANK.value, keep=_KEEP.value,
                           target_sparsity=_TARGET.value, steps=_STEPS.value,
                           calibration_batches=_CALIBRATION.value, step=_STEP.value, echo=print)
    if _JSON.value:
        print(json.dumps(summary))
    else:
        size = (f"{summary['bytes_before'] / 2**20:,.1f} -> {summary['bytes_after'] / 2**20:,.1f} MiB of weights"
                if "bytes_after" in summary else
                f"{summary['per_token_before']:,} -> {summary['per_token_after']:,} parameters read per token, "
                f"{summary['total_before']:,} -> {summary['total_after']:,} in all")
        print(f"compressed ({summary['method']}): {size}; wrote {summary['out']}")
    return 0


def main(argv) -> int:
    from scaling_sparse import process_watch
    from scaling_sparse.config import ConfigError

    if not flags.FLAGS["verbosity"].present:
        # At absl's default verbosity (INFO) orbax logs every save step through absl, and JAX logs each
        # backend it probes and does not find ("Unable to initialize backend 'tpu'") on a CPU-only
        # machine. Keep the console to our own output and real warnings; --verbosity=0 (or 1) shows all.
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    process_watch.log_fatal_dumps()
    try:
        commands = argv[1:]
        if len(commands) != 1 or commands[0] not in COMMANDS:
            raise UsageError(f"give exactly one command of {', '.join(COMMANDS)} (got {commands or 'none'}); "
                             "see --help")
        command = commands[0]
        if command == "compress":
            _check_compress_flags()
        config = _config()
        if command == "config":
            return cmd_config(config)
        if command != "params":
            from scaling_sparse import distributed

            distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                   init_timeout=_INIT_TIMEOUT.value, heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
        if command == "params":
            return cmd_params(config)
        workdir = _workdir()
        _check_object_store(command, workdir)
        return {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
                "compress": cmd_compress, "datastore": cmd_datastore}[command](config, workdir)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except RuntimeError as e:
        _exit_if_peer_failed(e)
        # Errors that carry their own exit status (e.g. train.NonFiniteError, checkpoint.CheckpointError,
        # train.WorkdirBusyError): a message naming the cause and the fix, not a traceback.
        code = getattr(e, "exit_code", None)
        if not isinstance(code, int) or isinstance(code, bool):
            raise
        print(f"error: {e}", file=sys.stderr)
        return code
    except Exception as e:
        _exit_if_peer_failed(e)
        raise


def _exit_if_peer_failed(error: Exception) -> None:
    """A multi-process run whose peer died: one message, then exit at once (JAX's exit-time shutdown would
    abort on the broken runtime with a stack dump)."""
    from scaling_sparse import process_watch

    message = process_watch.peer_failure_message(error, _WORKDIR.value)
    if message is not None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_FAILURE)


STORED_CONFIG = pathlib.Path(__file__).resolve().parent / "stored_config.py"


def _with_stored_config(argv: list[str]) -> list[str]:
    """argv with --config=stored_config.py:WORKDIR added when --workdir is given and --config is not,
    so the workdir's own config.json is loaded by config_flags and --config.FIELD overrides apply."""
    given = [i for i, a in enumerate(argv) if a.startswith("--config=")]
    if given and argv[given[-1]].endswith(".json"):  # a workdir's config.json: read it as the stored config
        from scaling_sparse import stored_config
        from scaling_sparse.config import ConfigError
        from scaling_sparse.storage import StorageError

        path = argv[given[-1]].split("=", 1)[1]
        try:
            stored_config.get_config(path)
        except (ConfigError, StorageError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        return [*argv[:given[-1]], f"--config={STORED_CONFIG}:{path}", *argv[given[-1] + 1:]]
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    workdir = None
    for i, a in enumerate(argv):
        if a.startswith("--workdir="):
            workdir = a.split("=", 1)[1]
        elif a == "--workdir" and i + 1 < len(argv):
            workdir = argv[i + 1]
    if not workdir:
        return argv
    from scaling_sparse import stored_config
    from scaling_sparse.config import ConfigError
    from scaling_sparse.storage import StorageError

    try:  # here, so a missing or damaged config.json reads as one line, not config_flags' traceback
        stored_config.get_config(workdir)
    except (ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    return [argv[0], f"--config={STORED_CONFIG}:{workdir}", *argv[1:]]


def _parse_flags(argv):
    """absl's parser, with bad flags and config overrides reported in one line, not a traceback."""
    argv = _with_stored_config(list(argv))
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = f"{e}"
    except AttributeError as e:
        if "get_config" not in str(e):
            message = _override_error(argv, e)
        else:
            message = (f"the --config file has no get_config() function ({e}). Fix: a config file defines "
                       "get_config() returning an ml_collections.ConfigDict, as experiments/configs/tiny.py does")
    except (KeyError, TypeError, ValueError) as e:
        message = _override_error(argv, e)
    print(f"error: {message}\nSee --help for the usage.", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _override_error(argv, e) -> str:
    """ml_collections raises AttributeError, KeyError, TypeError or ValueError for --config.<field> overrides
    naming no field or of the wrong type."""
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    return (f"cannot apply the config overrides {overrides} ({type(e).__name__}: {e}). Fix: use field "
            "names and value types of the config file (e.g. --config.train.num_steps=100)")


def run() -> None:
    """Console entry point (`python -m scaling_sparse`, `scaling-sparse`)."""
    from scaling_sparse import process_watch

    if process_watch.wanted(sys.argv):  # a multi-process run: a peer's failure ends in one message
        sys.exit(process_watch.run_watched(sys.argv))
    # absl's --help prints the __main__ module's docstring: make it this module's usage text.
    sys.modules["__main__"].__doc__ = __doc__
    app.run(main, flags_parser=_parse_flags)
