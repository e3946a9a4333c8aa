"""One training run per work directory: an exclusive lock on WORKDIR/.lock.

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


@contextlib.contextmanager
def workdir_lock(workdir, *, enabled: bool = True):
    """Holds WORKDIR/.lock for the block; raises WorkdirBusyError at once if another run holds it."""
    if not enabled:
        yield
        return
    import fcntl

    path = pathlib.Path(workdir) / LOCK_FILE
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
            raise WorkdirBusyError(
                f"{workdir} is in use by another training run ({who}). Two runs in one workdir would overwrite "
                "each other's checkpoints and metrics. Fix: wait for it or stop it, or use another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}))
        f.flush()
        yield
    finally:
        f.close()  # closing the descriptor releases the lock
