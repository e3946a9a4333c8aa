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

import contextlib
import json
import logging
import sys
import threading

import jax
import numpy as np
import ml_collections
import orbax.checkpoint as ocp

from scaling_sparse import storage
from scaling_sparse.config import ConfigError, ModelConfig

CHECKPOINT_DIR = "checkpoints"
SET_ASIDE_DIR = "checkpoints_set_aside"
CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint (or not the one asked for); the message says which and why."""

    exit_code = 1


class CheckpointSaveError(RuntimeError):
    """A save failed (a full disk, a lost mount); the message says what is intact."""

    exit_code = 1


@contextlib.contextmanager
def _held_orbax_errors():
    """Holds the ERROR records orbax logs (from each of its writer threads, with tracebacks) during a save:
    re-logged if the save succeeds anyway, dropped if it fails (the caller's one message says why).
    -> the held list. With --verbosity (absl at DEBUG) nothing is held."""
    logger = logging.getLogger("absl")
    held: list = []
    if logger.getEffectiveLevel() <= logging.DEBUG:
        yield held
        return

    def hold(record):
        if record.levelno >= logging.ERROR and "orbax" in record.pathname:
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)
    for record in held:
        logger.handle(record)


@contextlib.contextmanager
def _held_other_threads_stderr():
    """Holds what threads other than the main one print to sys.stderr during a save (tensorstore's
    callbacks print their tracebacks there, not through logging): printed after a save that succeeds,
    dropped (the caller clears the list) after one that fails. -> the held list of texts."""
    held: list = []
    if logging.getLogger("absl").getEffectiveLevel() <= logging.DEBUG:
        yield held
        return
    stream = sys.stderr
    sys.stderr = _MainThreadOnly(stream, held)
    try:
        yield held
    finally:
        if getattr(sys.stderr, "held", None) is held:  # not turned into a dropping wrapper by a failed save
            sys.stderr = stream
        stream.write("".join(held))


class Checkpointer:
    """An orbax CheckpointManager keeping the last `keep` steps of one workdir, plus any `protected`
    step (the checkpoint a run resumed from stays until that run ends normally: if it diverges, the
    state it started from is still there)."""

    def __init__(self, workdir, *, keep: int = 3, read_only: bool = False):
        directory = storage.path(workdir) / CHECKPOINT_DIR
        self.directory = directory if storage.is_object_store(directory) else directory.absolute()
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
        with _held_orbax_errors() as held, _held_other_threads_stderr() as printed:
            try:
                self.manager.save(int(step), args=args, force=True)
                self.manager.wait_until_finished()
            except Exception as e:
                # The message below says it once; orbax logged it from each of its threads, and its writes
                # still in flight print a traceback each when they end (now or after the save has returned).
                held.clear()
                printed.clear()
                _quiet_abandoned_orbax_work()
                raise self._save_failed(int(step), e) from None
        self.rotate()

    def _save_failed(self, step: int, error: Exception) -> "CheckpointSaveError":
        """Removes the incomplete step a failed save left (its space is what a full disk needs) and says what
        is intact."""
        for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            try:
                storage.remove_tree(partial)
            except Exception as e:  # noqa: BLE001 - the save's own error is the one to report
                print(f"warning: {partial} could not be removed ({e})", file=sys.stderr)
        text = str(error)
        cause = ("no space left on the device" if "No space left" in text or "os_error_code='28'" in text
                 else f"{type(error).__name__}: {text.strip().splitlines()[0][:200] if text.strip() else ''}")
        self.manager.reload()
        intact = [s for s in self.all_steps() if s != step]
        # On GCS orbax writes the step in place and marks it complete last (no temporary directory to remove):
        # the incomplete one is never read as a checkpoint.
        gone = ("the incomplete one has no commit marker and is not read" if storage.is_object_store(self.directory)
                else "the incomplete one was removed")
        kept = (f"The checkpoints at steps {intact} in {self.directory} are intact and {gone}; running the same "
                f"command again resumes from step {intact[-1]}" if intact else
                f"No earlier checkpoint is in {self.directory}; {gone}")
        fix = "free space on that disk" if cause.startswith("no space") else "check the disk and its permissions"
        return CheckpointSaveError(f"saving the checkpoint at step {step} failed ({cause}). {kept}. Fix: {fix}, "
                                   "then run the same command again")

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
        if not steps:
            raise CheckpointError(f"there are no checkpoints in {self.directory} yet (the run there saved none). "
                                  f"Fix: train first (python -m scaling_sparse train --workdir={self.directory.parent})")
        failures, other_shapes = [], []
        for candidate in ([step] if step is not None else sorted(steps, reverse=True)):
            # Shapes first, from the checkpoint's metadata: a model of another size is a config error, and a
            # restore that fails part-way leaves orbax's reads to fail noisily in the background.
            mismatch = self._other_shapes(target, candidate)
            try:
                if mismatch:
                    other_shapes.append(candidate)
                    raise ValueError(f"its parameters have other shapes than the model's: {mismatch}")
                with quiet_failed_reads():
                    state, data_state = self.restore(target, candidate, partial=partial)
            except Exception as e:  # orbax, tensorstore and JSON raise many types for a damaged step
                first = str(e).strip().splitlines()[0].split(" See full TensorStore details")[0] if str(e).strip() else ""
                reason = f"{type(e).__name__}: {first[:300]}"
                failures.append((candidate, reason))
                if not mismatch:
                    echo(f"warning: the checkpoint at step {candidate} in {self.directory} cannot be read ({reason})"
                         + ("; trying an older one" if step is None else ""))
                continue
            return state, data_state, candidate, failures
        listing = "; ".join(f"step {s}: {r}" for s, r in failures)
        if len(other_shapes) == len(failures):
            raise CheckpointError(
                f"the checkpoints in {self.directory} hold a model of other shapes than the config's ({failures[0][1]}"
                f"). Nothing was changed there. Fix: pass the config they were trained with (their run's "
                f"{CONFIG_FILE}, unless it was edited, or the config file and overrides used to train them)")
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} ({listing}). Nothing was changed there. Fix: restore "
            "the checkpoints from a copy of the work directory, or train in a new --workdir")

    def _other_shapes(self, target: dict, step: int) -> str:
        """'' when the checkpoint's stored parameter shapes are those of `target` (or its metadata cannot be
        read: the restore then says why), else the first few that differ."""
        if "params" not in target:
            return ""
        try:
            stored = self.manager.item_metadata(step)["state"]
            have = _shapes_by_name(getattr(stored, "tree", stored)["params"])
        except Exception:  # damaged metadata: the restore reports it
            return ""
        want = _shapes_by_name(target["params"])
        differ = [f"{k}: checkpoint {have.get(k, 'absent')}, model {want[k]}" for k in want if have.get(k) != want[k]]
        differ += [f"{k}: checkpoint {have[k]}, model absent" for k in have if k not in want]
        return "; ".join(differ[:3]) + (f" (and {len(differ) - 3} more)" if len(differ) > 3 else "")

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
                storage.move_tree(source, dest)
                echo(f"moved the {why} checkpoint at step {step} to {dest} (kept for inspection)")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _shapes_by_name(tree) -> dict:
    """{"stack/blocks/0/attn/out/kernel": shape} (orbax's metadata keeps list indices as strings)."""
    def name(path):
        return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)

    return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class _MainThreadOnly:
    """sys.stderr where what other threads write is held in `held` (a list), or dropped when held is None
    (orbax's reads and writes still in flight fail when its event loop has closed, each printing a
    traceback)."""

    def __init__(self, stream, held: list | None = None):
        self._stream = stream
        self.held = held

    def write(self, text):
        if threading.current_thread() is threading.main_thread():
            return self._stream.write(text)
        if self.held is not None:
            self.held.append(text)
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def quiet_failed_reads():
    """Around a restore that may fail part-way (a damaged or deleted file): orbax's remaining reads then
    fail in background threads ("Event loop is closed", "Exception ignored in <coroutine ...>"), tens of
    tracebacks after the one error that matters, and asyncio logs "Task exception was never retrieved"
    with a traceback when such an abandoned read is collected (from any thread, through its logging
    handler, which writes to the stream it was given). Those are not printed unless --verbosity is given
    (logging at DEBUG); the restore's own exception is raised as usual."""
    try:
        yield
    except Exception:
        _quiet_abandoned_orbax_work()
        raise


def _quiet_abandoned_orbax_work() -> None:
    """For the rest of a process whose restore or save failed part-way: orbax's reads and writes still in
    flight finish after its event loop has closed, and each prints a traceback from its own thread
    (tensorstore's callback, "Event loop is closed"). Dropped unless --verbosity (absl at DEBUG)."""
    if logging.getLogger("absl").getEffectiveLevel() > logging.DEBUG:
        if isinstance(sys.stderr, _MainThreadOnly):
            sys.stderr.held = None  # a save's holding wrapper stays, now dropping (see _held_other_threads_stderr)
        else:
            sys.stderr = _MainThreadOnly(sys.stderr)
        if not getattr(sys.unraisablehook, "quiet_coroutines", False):
            default = sys.unraisablehook

            def hook(unraisable):
                return None if "coroutine" in repr(unraisable.object) else default(unraisable)

            hook.quiet_coroutines = True
            sys.unraisablehook = hook
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # the abandoned work's "never retrieved"


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return ocp.utils.to_shape_dtype_struct(x)
    x = np.asarray(x)  # numpy arrays and scalars
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def save_config(config: ml_collections.ConfigDict, workdir) -> None:
    """Writes WORKDIR/config.json atomically; a damaged one there is renamed, not overwritten."""
    path = storage.path(workdir) / CONFIG_FILE
    try:
        load_saved_config(workdir)
    except DamagedConfigError:
        import time

        damaged = path.with_name(f"{CONFIG_FILE}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        if storage.is_object_store(path):  # no rename there: a copy, then the write below replaces it
            damaged.write_bytes(path.read_bytes())
        else:
            path.rename(damaged)
    if config.train.get("take_over_lease", False):  # for this start only: a resume must not inherit it
        config = ml_collections.ConfigDict(config.to_dict())
        config.train.take_over_lease = False
    storage.write_atomic(path, config.to_json_best_effort(indent=2, sort_keys=True))


class DamagedConfigError(ConfigError):
    """WORKDIR/config.json exists but is not a config (truncated, garbled, edited into another shape)."""


def load_saved_config(workdir) -> ml_collections.ConfigDict | None:
    """WORKDIR/config.json (or the .json file `workdir` names), None if absent; DamagedConfigError if it
    cannot be read as a config."""
    path = storage.path(workdir)
    path = path if path.suffix == ".json" else path / CONFIG_FILE
    if not path.exists():
        return None
    try:
        values = json.loads(path.read_text())
        sections = [k for k, v in values.items() if not isinstance(v, dict)] if isinstance(values, dict) else None
        if sections is None or sections or "model" not in values or "train" not in values:
            raise ValueError("not a JSON object with model, train, ... sections" if sections is None or not sections
                             else f"{sections[0]!r} is not a section")
        return ml_collections.ConfigDict(values)
    except (ValueError, UnicodeDecodeError, TypeError, OSError) as e:
        raise DamagedConfigError(f"{path} cannot be read as a config ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _param_shapes(model_config) -> dict:
    from scaling_sparse.state import model_spec

    return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), model_spec(model_config).params)


def check_compatible(config: ml_collections.ConfigDict, workdir) -> None:
    """Raises ConfigError when `config.model` builds parameters the workdir's checkpoints don't hold."""
    try:
        saved = load_saved_config(workdir)
    except DamagedConfigError as e:  # the config given (--config) is the one to trust; restoring checks it
        print(f"warning: {e}; not compared with the config given. A training run keeps it as "
              f"{CONFIG_FILE}.damaged-<time> and writes the config it runs with", file=sys.stderr)
        return
    if saved is None:
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
        f"config the run was trained with (saved in {storage.path(workdir) / CONFIG_FILE}) or use a new --workdir.")
