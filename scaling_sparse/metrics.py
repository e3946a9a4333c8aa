"""Metric writers: the console, WORKDIR/metrics.jsonl (one JSON object per logged step) and
TensorBoard event files (tensorboardX; skipped with one warning when it is not installed)."""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Callable

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

_warned_no_tensorboard = False


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
    path = pathlib.Path(workdir) / METRICS_FILE
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
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / METRICS_FILE
        self.enabled = enabled
        self.echo = echo if enabled else None
        self._tb = _open_tensorboard(self.workdir / TENSORBOARD_DIR) if tensorboard and enabled else None

    def truncate_after(self, step: int) -> None:
        """Drops records past `step`: a run resumed from a checkpoint at `step` logs them again."""
        if not self.enabled:
            return
        kept = [r for r in read_metrics(self.workdir) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)  # atomic: a crash here leaves the old file or the new one

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: (float(v) if not isinstance(v, (str, bool, int)) else v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(name, value, int(step))
            self._tb.flush()
        if self.echo is not None:
            self.echo(" | ".join(f"{k} {_format(v)}" for k, v in record.items()))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
