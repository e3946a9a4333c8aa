"""One training run per work directory: an exclusive lock on WORKDIR/.lock (on object storage, a lease:
workdir_lease.py).

The lock is an fcntl (flock) lock, so the operating system releases it when the process dies, also
on SIGKILL: a crashed run never leaves a stale lock behind. The file holds who took it (pid, host,
start time, command) so a refused run can name the other one. Several processes of one multi-host
run share the workdir: the lock belongs to the run, so only its primary process takes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import sys
import time

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""

    exit_code = 1


class WorkdirNotWritableError(RuntimeError):
    """The work directory cannot be created or written (a read-only disk, no permission)."""

    exit_code = 1


def check_writable(workdir) -> None:
    """Creates `workdir` if needed and writes (then removes) a file there, so a read-only or full disk stops
    a run before it reads, trains or changes anything."""
    import tempfile

    from scaling_sparse import storage

    workdir = storage.path(workdir)
    try:
        if storage.is_object_store(workdir):  # no directories there: an object written and removed
            import uuid

            probe = workdir / f".write_check_{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink(missing_ok=True)
            return
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_check_"):
            pass
    except Exception as e:  # noqa: BLE001 - OSError on disk; gcsfs raises its HttpError for a bucket
        if not isinstance(e, OSError) and not storage.is_object_store(workdir):
            raise
        raise WorkdirNotWritableError(
            f"the work directory {workdir} cannot be written ({getattr(e, 'strerror', None) or e}): training writes its checkpoints, "
            "metrics and config.json there. Nothing was changed. Fix: make it writable, or give a --workdir on a "
            "writable disk (a copy of this one resumes from its checkpoints)") from None


@contextlib.contextmanager
def workdir_lock(workdir, *, enabled: bool = True):
    """Holds WORKDIR/.lock for the block; raises WorkdirBusyError at once if another run holds it."""
    if not enabled:
        yield None
        return
    busy = (f"{workdir} is in use by another training run ({{who}}). Two runs in one workdir would overwrite "
            "each other's checkpoints and metrics. Fix: wait for it or stop it, or use another --workdir")
    with file_lock(pathlib.Path(workdir) / LOCK_FILE, busy):
        yield None


@contextlib.contextmanager
def file_lock(path, busy_message: str):
    """Holds an exclusive lock on the file `path` (created if absent) for the block, recording who holds
    it; raises WorkdirBusyError(busy_message with {who} filled in) at once if another process holds it."""
    import fcntl

    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                   if holder else "another process")
            raise WorkdirBusyError(busy_message.format(who=who)) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}))
        f.flush()
        yield
    finally:
        f.close()  # closing the descriptor releases the lock
