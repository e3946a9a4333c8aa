"""Reading the trained (teacher) workdir and writing a compressed model as an ordinary workdir
(docs/compression.md): config.json, the tokenizer, one checkpoint of a full train state, and
compression.json saying what was done."""

from __future__ import annotations

import contextlib
import json
import pathlib
import shutil

import jax
import ml_collections

from scaling_sparse import sharding
from scaling_sparse.checkpoint import CONFIG_FILE, Checkpointer, CheckpointError, save_config
from scaling_sparse.config import ConfigError, ModelConfig, validate
from scaling_sparse.data.tokenizer import TOKENIZER_FILES

PROVENANCE_FILE = "compression.json"
LOCK_NAME = ".compress.lock"  # in the assembly folder, held while a run writes it
# What the new run needs from the source workdir to read the same text the same way (the token
# cache is fingerprinted by its source and tokenizer, data/cache.py: copied, it spares a re-tokenisation).
DATA_CACHE_DIR = "data_cache"
# What a compressed model may differ in from its dense source: only these (plus the shape fields).
DENSE_FIELDS = (("arch", "decoder"), ("reversible", False), ("attention", "full"), ("ff_sparsity", 0),
                ("attn_sparsity", 0), ("loss_sparsity", 0), ("loss_lowrank", 0), ("ff_sru_units", 0),
                ("factor_rank_attn", 0), ("factor_rank_ff", 0), ("layer_heads", ()), ("layer_d_ff", ()))


def check_dense_source(config) -> ModelConfig:
    """The source's ModelConfig; a ConfigError unless it is a plain dense decoder-only model."""
    m = ModelConfig.from_config(config.model)
    for field, plain in DENSE_FIELDS:
        if getattr(m, field) != plain:
            raise ConfigError(f"compress needs a dense decoder-only checkpoint; the source has model.{field}="
                              f"{getattr(m, field)!r}. Fix: compress a run trained with a dense config "
                              "(e.g. experiments/configs/stdlib.py); sparse models are the alternative compared, "
                              "not a starting point")
    return m


def load_teacher(config, workdir, *, step: int | None = None):
    """-> (graphdef, params, step, data_state): the trained weights on one device and the data
    iterator position saved with that checkpoint."""
    from scaling_sparse.checkpoint import check_compatible
    from scaling_sparse.state import train_state_layout

    validate(config)
    check_compatible(config, workdir)
    mesh = sharding.single_device_mesh()
    layout = train_state_layout(config, mesh)
    target = {"params": layout.abstract["params"], "step": layout.abstract["step"]}
    with Checkpointer(workdir, read_only=True) as ckpt:
        state, data_state, _, _ = ckpt.restore_readable(target, step, partial=True)
    return layout.graphdef, jax.device_get(state["params"]), int(state["step"]), data_state


def derived_config(config, **model_fields) -> ml_collections.ConfigDict:
    """A copy of `config` with model fields replaced, validated."""
    new = ml_collections.ConfigDict(config.to_dict())
    for name, value in model_fields.items():
        new.model[name] = value
    return validate(new)


def check_out(src, out) -> pathlib.Path:
    """`out` must be new (or empty) and not the source: nothing already written is touched."""
    src, out = pathlib.Path(src).resolve(), pathlib.Path(out).resolve()
    if out == src:
        raise CheckpointError(f"--out {out} is the same directory as --workdir. Fix: give a new directory for the "
                              "compressed model")
    if src in out.parents:  # the next `train` on the source would set it aside as an unreadable checkpoint
        raise CheckpointError(f"--out={out} is inside the source workdir {src}. Fix: give a directory outside it "
                              f"(e.g. {src.parent / (src.name + '_compressed')})")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out={out} is an existing file. Fix: give a new directory for the compressed model")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--out={out} already holds files. Fix: choose a new --out, or delete that directory")
    return out


def partial_dir(out: pathlib.Path) -> pathlib.Path:
    """Where the compressed model is assembled before it is renamed to `out`."""
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def claim_out(src, out):
    """Holds `out` for one compress run: its assembly folder is created and locked (a second run to the same
    --out stops at once, naming the first), leftovers of a crashed run are cleared, and a run that fails
    removes what it assembled. -> the checked `out` path."""
    from scaling_sparse.workdir_lock import file_lock

    out = check_out(src, out)
    partial = partial_dir(out)
    try:
        partial.mkdir(parents=True, exist_ok=True)
        lock = partial / LOCK_NAME
        lock.touch()
    except OSError as e:
        raise CheckpointError(f"--out={out} cannot be written ({e.strerror or e}: {e.filename or partial.parent}). "
                              "Fix: give a --out on a writable disk") from None
    busy = (f"--out={out} is being written by another compress run ({{who}}). Fix: wait for it to finish, or "
            "give another --out")
    with file_lock(lock, busy):
        for leftover in partial.iterdir():  # a crashed earlier run's: it held no lock, so nothing is writing it
            if leftover.name != LOCK_NAME:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        try:
            yield out
        finally:
            if partial.exists():  # the run failed before its rename: nothing it assembled stays behind
                shutil.rmtree(partial, ignore_errors=True)


def write_model(new_config, params: dict, src_workdir, out, *, step: int, data_state: dict, provenance: dict,
                echo=print) -> pathlib.Path:
    """Writes `out` as an ordinary workdir of `new_config` holding `params`. The model is assembled in
    out/.partial and renamed at the end, so a crash never leaves a directory that looks complete."""
    from scaling_sparse.optim import make_optimizer, optimizer_settings
    from scaling_sparse.state import model_spec, train_key, train_state_layout

    out = check_out(src_workdir, out)
    partial = partial_dir(out)  # created and locked by claim_out
    for name in TOKENIZER_FILES:
        if (pathlib.Path(src_workdir) / name).exists():
            shutil.copy2(pathlib.Path(src_workdir) / name, partial / name)
    if (pathlib.Path(src_workdir) / DATA_CACHE_DIR).is_dir():
        shutil.copytree(pathlib.Path(src_workdir) / DATA_CACHE_DIR, partial / DATA_CACHE_DIR)
    m = ModelConfig.from_config(new_config.model)
    spec = model_spec(m)
    want = jax.tree.map(lambda s: (tuple(s.shape), str(s.dtype)), spec.params)
    have = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), params)
    if want != have:
        raise ValueError(f"the compressed parameters do not match the model of the new config:\n want {want}\n have {have}")
    mesh = sharding.single_device_mesh()
    layout = train_state_layout(new_config, mesh)
    params = jax.device_put(params, layout.param_shardings)
    # int8 weights are not trained: no optimizer state (state.py's layout holds none for them).
    opt_state = ({} if m.weights == "int8" else
                 make_optimizer(dict(optimizer_settings(new_config.train)), layout.axes).init(params))
    state = {"params": params, "opt_state": opt_state, "step": jax.numpy.asarray(step, jax.numpy.int32),
             "rng": train_key(int(new_config.train.seed))}
    state = jax.device_put(state, layout.shardings)
    with Checkpointer(partial, keep=new_config.train.keep_checkpoints) as ckpt:
        ckpt.save(step, state, data_state)
    (partial / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str))
    save_config(new_config, partial)
    out = check_out(src_workdir, out)  # still new: nothing written there meanwhile
    if out.exists():
        out.rmdir()  # empty (check_out)
    partial.rename(out)
    (out / LOCK_NAME).unlink()  # the lock stays held (by descriptor) until claim_out ends
    echo(f"wrote {out} ({CONFIG_FILE}, tokenizer, checkpoint at step {step}, {PROVENANCE_FILE})")
    return out


def parameter_counts(config) -> dict:
    """{"total", "per_token"} of a config's model (no weights built)."""
    from scaling_sparse.params import report_params

    r = report_params(config)
    return {"total": r["total_params"], "per_token": r["params_per_token"]}
