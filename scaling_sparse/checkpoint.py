"""Checkpoints (orbax) and the run's saved config.

A checkpoint holds two items per step under WORKDIR/checkpoints/<step>/:
  - "state": {"params", "opt_state", "step", "rng"} as plain pytrees of arrays (params as NNX's
    pure dict, so the on-disk format does not depend on NNX's Variable classes);
  - "data": the training iterator's position (data.train.get_state(), JSON).
orbax writes each step into a temporary directory and renames it when complete, so a crash during
a save leaves the previous checkpoints restorable; leftover temporary directories are ignored and
removed by the next writer.

A checkpoint that cannot be read (corrupted files, garbled metadata, an empty step directory) is
never mistaken for a good one and never deleted: `restore_readable` says which step failed and why
and falls back to the newest readable one; a training run then moves the unreadable steps into
WORKDIR/checkpoints_set_aside/ (so new saves cannot collide with them), where they stay for a person
to inspect. The training loop saves only finite states (train.py), so every checkpoint kept is a
good one and `keep_checkpoints` never rotates the last good state out.

WORKDIR/config.json records the config the run was trained with: eval, generate and a resumed
run compare their model against it and fail with a ConfigError naming the differing fields
instead of a pytree mismatch deep inside orbax.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import ml_collections
import orbax.checkpoint as ocp

from scaling_sparse.config import ConfigError, ModelConfig

CHECKPOINT_DIR = "checkpoints"
SET_ASIDE_DIR = "checkpoints_set_aside"
CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint (or not the one asked for); the message says which and why."""

    exit_code = 1


class Checkpointer:
    """An orbax CheckpointManager keeping the last `keep` steps of one workdir, plus any `protected`
    step (the checkpoint a run resumed from stays until that run ends normally: if it diverges, the
    state it started from is still there)."""

    def __init__(self, workdir, *, keep: int = 3, read_only: bool = False):
        self.directory = (pathlib.Path(workdir) / CHECKPOINT_DIR).absolute()
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(
                f"no checkpoints in {self.directory}: train first "
                f"(python -m scaling_sparse train --config=... --workdir={workdir})")
        self.keep = keep
        self.protected: set[int] = set()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # rotation is ours (rotate): it must spare the protected steps
            create=not read_only,
            # The writer removes tmp directories a crashed save left behind; readers touch nothing.
            cleanup_tmp_directories=not read_only,
            # Synchronous saves: the train step donates its buffers, and a checkpoint must be
            # complete before a SIGTERM'd process exits.
            enable_async_checkpointing=False,
        )
        self.read_only = read_only
        # One handler per item, fixed: a restore of only some entries (partial) and a full one use the
        # same PyTree handler (StandardSave wrote the same format, so older checkpoints restore too).
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: dict | None = None) -> None:
        if self.read_only:
            raise RuntimeError("this Checkpointer was opened read_only")
        state = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, state)
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state or {}))
        self.manager.save(int(step), args=args, force=True)
        self.manager.wait_until_finished()
        self.rotate()

    def rotate(self) -> None:
        """Deletes all but the newest `keep` steps and the protected ones."""
        steps = self.all_steps()
        for old in steps[:max(len(steps) - self.keep, 0)]:
            if old not in self.protected:
                self.manager.delete(old)

    def restore(self, target: dict, step: int | None = None, *, partial: bool = False) -> tuple[dict, dict]:
        """Restores `state` shaped like `target` (arrays or ShapeDtypeStructs; a ShapeDtypeStruct's
        sharding is where its array lands, whatever mesh wrote it) -> (state, data_state).
        partial=True reads only the entries `target` names (e.g. the parameters without the optimizer)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}: train first")
        abstract = jax.tree.map(_abstract, target)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        item = (ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True) if partial
                else ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
        restored = self.manager.restore(int(step), args=ocp.args.Composite(state=item, data=ocp.args.JsonRestore()))
        return restored.state, dict(restored.data or {})

    def restore_readable(self, target: dict, step: int | None = None, *, partial: bool = False,
                         echo=None) -> tuple[dict, dict, int, list]:
        """The newest checkpoint that can be read (or exactly `step`) -> (state, data_state, step,
        [(unreadable newer step, reason), ...]). Raises CheckpointError when none can be read."""
        echo = echo or (lambda s: print(s, file=sys.stderr))  # stdout is generate's text
        steps = self.all_steps()
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; the steps there are "
                                  f"{steps or 'none'}. Fix: pick one of them with --step, or leave --step out")
        failures = []
        for candidate in ([step] if step is not None else sorted(steps, reverse=True)):
            try:
                state, data_state = self.restore(target, candidate, partial=partial)
            except Exception as e:  # orbax, tensorstore and JSON raise many types for a damaged step
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                failures.append((candidate, reason))
                echo(f"warning: the checkpoint at step {candidate} in {self.directory} cannot be read ({reason})"
                     + ("; trying an older one" if step is None else ""))
                continue
            return state, data_state, candidate, failures
        listing = "; ".join(f"step {s}: {r}" for s, r in failures) or "there are none"
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} ({listing}). Nothing was changed there. Fix: if the "
            f"model config changed, pass the config the checkpoints were trained with (saved in {CONFIG_FILE}); "
            "otherwise train in a new --workdir")

    def set_aside(self, steps, why: str, echo=print) -> None:
        """Moves step directories out of the way (never deletes them): WORKDIR/checkpoints_set_aside/."""
        import time

        if not steps:
            return
        target = self.directory.parent / SET_ASIDE_DIR
        target.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in steps:
            source = self.directory / str(step)
            if source.exists():
                dest = target / f"{step}-{why}-{stamp}"
                source.rename(dest)
                echo(f"moved the {why} checkpoint at step {step} to {dest} (kept for inspection)")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return ocp.utils.to_shape_dtype_struct(x)
    x = np.asarray(x)  # numpy arrays and scalars
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def save_config(config: ml_collections.ConfigDict, workdir) -> None:
    """Writes WORKDIR/config.json atomically."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    tmp.replace(path)


def load_saved_config(workdir) -> ml_collections.ConfigDict | None:
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _param_shapes(model_config) -> dict:
    from scaling_sparse.state import model_spec

    return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), model_spec(model_config).params)


def check_compatible(config: ml_collections.ConfigDict, workdir) -> None:
    """Raises ConfigError when `config.model` builds parameters the workdir's checkpoints don't hold."""
    saved = load_saved_config(workdir)
    if saved is None or "model" not in saved:
        return
    current = config.model.to_dict()
    before = saved.model.to_dict()
    differing = sorted(k for k in set(current) | set(before) if current.get(k) != before.get(k))
    if not differing:
        return
    # Fields missing from an older config.json keep today's defaults.
    merged = ModelConfig.from_config({**current, **{k: v for k, v in before.items() if k in current}})
    if _param_shapes(ModelConfig.from_config(current)) == _param_shapes(merged):
        return  # e.g. dropout or dtype changed: same parameters, allowed
    changes = ", ".join(f"model.{k}: checkpoint {before.get(k)!r}, config {current.get(k)!r}" for k in differing)
    raise ConfigError(
        f"the config's model does not match the checkpoints in {workdir} ({changes}). Fix: pass the "
        f"config the run was trained with (saved in {pathlib.Path(workdir) / CONFIG_FILE}) or use a new --workdir.")
