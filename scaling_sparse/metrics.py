"""Metric writers: the console, WORKDIR/metrics.jsonl (one JSON object per logged step) and
TensorBoard event files (tensorboardX; skipped with one warning when it is not installed)."""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import sys
import time
from typing import Callable

from scaling_sparse import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
TB_SYNC_S = 30.0  # object-store workdirs: seconds between copies of the TensorBoard event files

_warned_no_tensorboard = False


class MetricsWriteError(RuntimeError):
    """metrics.jsonl could not be appended to (a full disk); the message says how to go on."""

    exit_code = 1


def _open_tensorboard(logdir: pathlib.Path):
    global _warned_no_tensorboard
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        if not _warned_no_tensorboard:
            print("warning: tensorboardX is not installed; TensorBoard logging is off "
                  "(pip install tensorboardX to enable it)", file=sys.stderr)
            _warned_no_tensorboard = True
        return None
    return SummaryWriter(str(logdir))


def read_metrics(workdir) -> list[dict]:
    """All records of WORKDIR/metrics.jsonl, in order. A torn last line (the process was killed while
    appending it) is dropped: the resumed run logs that step again."""
    path = storage.path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


class MetricsWriter:
    """`write(step, metrics)` sends one record to every sink. Use as a context manager.
    enabled=False (every process but the primary one of a multi-process run) writes nothing."""

    def __init__(self, workdir, *, tensorboard: bool = True, echo: Callable[[str], None] | None = print,
                 enabled: bool = True):
        self.workdir = storage.path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.enabled = enabled
        self.echo = echo if enabled else None
        # On object storage (no append) metrics.jsonl is rewritten whole with each record, and TensorBoard
        # writes its event files locally, copied to WORKDIR/tensorboard/ every TB_SYNC_S seconds and at close.
        self.remote = storage.is_object_store(self.workdir)
        self._lines = [json.dumps(r) + "\n" for r in read_metrics(self.workdir)] if self.remote and enabled else []
        if not self.remote:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self._tb_dir = (storage.local_mirror(self.workdir) if self.remote else self.workdir) / TENSORBOARD_DIR
        self._tb = _open_tensorboard(self._tb_dir) if tensorboard and enabled else None
        self._tb_synced = time.monotonic()

    def truncate_after(self, step: int) -> None:
        """Drops records past `step`: a run resumed from a checkpoint at `step` logs them again."""
        if not self.enabled:
            return
        kept = [r for r in read_metrics(self.workdir) if r.get("step", 0) <= step]
        self._lines = [json.dumps(r) + "\n" for r in kept]
        storage.write_atomic(self.path, "".join(self._lines))  # a crash here leaves the old file or the new one

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: (float(v) if not isinstance(v, (str, bool, int)) else v) for k, v in metrics.items()})
        try:
            if self.remote:
                self._lines.append(json.dumps(record) + "\n")
                storage.write_atomic(self.path, "".join(self._lines))
            else:
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        except Exception as e:  # noqa: BLE001 - OSError on disk; gcsfs raises its HttpError for a bucket
            if not isinstance(e, OSError) and not self.remote:
                raise
            raise MetricsWriteError(f"writing the metrics of step {step} to {self.path} failed "
                                    f"({getattr(e, 'strerror', None) or e}). Fix: free space on that disk (or "
                                    "check its permissions or the bucket's), then run the same command again: it "
                                    "resumes from the last checkpoint") from None
        if self._tb is not None:
            try:
                for name, value in record.items():
                    if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                        self._tb.add_scalar(name, value, int(step))
                self._tb.flush()
                if self.remote and time.monotonic() - self._tb_synced > TB_SYNC_S:
                    self._sync_tensorboard()
            except Exception as e:  # noqa: BLE001 - as above
                if not isinstance(e, OSError) and not self.remote:
                    raise
                self._drop_tensorboard(e)
        if self.echo is not None:
            self.echo(" | ".join(f"{k} {_format(v)}" for k, v in record.items()))

    def _drop_tensorboard(self, error: Exception) -> None:
        """TensorBoard's event file could not be written (a full disk): one warning, and the run goes on
        with metrics.jsonl, the record every tool here reads. The writer is marked closed so that
        tensorboardX's own exit handler does not retry the write with a traceback."""
        print(f"warning: TensorBoard logging stopped: writing {self._tb_dir} failed "
              f"({getattr(error, 'strerror', None) or error}); {self.path} still has every step", file=sys.stderr)
        for file_writer in (getattr(self._tb, "all_writers", None) or {}).values():  # tensorboardX internals
            event_writer = getattr(file_writer, "event_writer", None)
            if event_writer is None or event_writer._closed:
                continue
            event_writer._closed = True
            with contextlib.suppress(Exception):  # its writer thread ends; its last write may fail too
                event_writer._worker.stop()
            with contextlib.suppress(Exception):
                event_writer._ev_writer.close()
        self._tb = None

    def _sync_tensorboard(self) -> None:
        """Copies the local event files of an object-store workdir to WORKDIR/tensorboard/ (each whole)."""
        for f in sorted(self._tb_dir.rglob("*")):
            if f.is_file():
                storage.write_atomic(self.workdir / TENSORBOARD_DIR / f.relative_to(self._tb_dir).as_posix(),
                                     f.read_bytes())
        self._tb_synced = time.monotonic()

    def close(self) -> None:
        if self._tb is not None:
            try:
                self._tb.close()
                if self.remote:
                    self._sync_tensorboard()
            except Exception as e:  # noqa: BLE001 - as above
                if not isinstance(e, OSError) and not self.remote:
                    raise
                self._drop_tensorboard(e)
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
