"""One training run per object-store work directory: a lease object, WORKDIR/.lease (docs/storage.md).

Object stores have no locks a dead process gives back, so the rule is a lease:
  - taking it: the object is created with a precondition that it does not exist yet (GCS
    ifGenerationMatch=0, S3 If-None-Match: *, through fsspec's exclusive create), so of two runs
    starting together exactly one gets it; the other is refused, naming the holder;
  - holding it: the run rewrites the lease every `renew_s` seconds (a thread) with the time of renewal;
    before each renewal it reads the lease, and if another run's token is there (it took a stale lease
    over) it stops renewing and the run is told at its next step (`lost()`);
  - a stale lease (not renewed for `stale_s`, 10 minutes by default: the holder was killed or cut off)
    is taken over: deleted, then created again with the same precondition;
  - the run ends normally: the lease is deleted.
A SIGKILLed run leaves its lease; the next run waits out `stale_s` from the last renewal or is told
how to take it over at once (--config.train.take_over_lease=True, when the person knows the run is dead).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid

from scaling_sparse import storage
from scaling_sparse.workdir_lock import WorkdirBusyError

LEASE_FILE = ".lease"
RENEW_S = 30.0
STALE_S = 600.0


class LeaseLostError(RuntimeError):
    """Another run took this run's lease over (this run had not renewed it for longer than the stale limit)."""

    exit_code = 1


def _filesystem(url: str):
    import fsspec

    storage.configure_fsspec()
    return fsspec.core.url_to_fs(url)


def _read(fs, key) -> dict | None:
    fs.invalidate_cache(key)  # fsspec caches listings: the lease's size and existence must be fresh
    try:
        with fs.open(key, "rb") as f:
            return json.loads(f.read() or b"{}")
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # torn or foreign content: treated as a lease of unknown age (see `_age`)


def _create(fs, key, record: dict) -> bool:
    """Creates the lease object only if absent -> whether this call created it."""
    try:
        with fs.open(key, "xb") as f:
            f.write(json.dumps(record).encode())
        return True
    except FileExistsError:
        return False
    except OSError as e:  # a precondition failure some fsspec versions report as a plain OSError
        if "412" in str(e) or "Precondition" in str(e):
            return False
        raise


class WorkdirLease:
    def __init__(self, workdir, *, renew_s: float = RENEW_S, stale_s: float = STALE_S, take_over: bool = False):
        self.url = f"{str(workdir).rstrip('/')}/{LEASE_FILE}"
        self.fs, self.key = _filesystem(self.url)
        self.renew_s, self.stale_s, self.take_over = renew_s, stale_s, take_over
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"token": self.token, "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.started)) + " UTC",
                "renewed_unix": time.time()}

    def acquire(self, workdir) -> None:
        if _create(self.fs, self.key, self._record()):
            self._start_renewing()
            return
        holder = _read(self.fs, self.key) or {}
        age = time.time() - float(holder.get("renewed_unix", 0.0) or 0.0)
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, lease renewed "
               f"{age:.0f} s ago" if holder.get("token") else "a lease of unknown content")
        if age < self.stale_s and not self.take_over:
            raise WorkdirBusyError(
                f"{workdir} is in use by another training run ({who}). Two runs in one workdir would overwrite each "
                f"other's checkpoints and metrics. Fix: wait for it or stop it, or use another --workdir. A run that "
                f"was killed leaves its lease: it is taken over {self.stale_s:.0f} s after its last renewal, or at once "
                "with --config.train.take_over_lease=True when you know that run is dead")
        print(f"warning: taking over the lease of {workdir} ({who}): that run is taken to be dead", file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.key)
        if not _create(self.fs, self.key, self._record()):
            raise WorkdirBusyError(f"{workdir}: another run took the stale lease over at the same moment. Fix: "
                                   "stop one of the two runs")
        self._start_renewing()

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="workdir-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                holder = _read(self.fs, self.key)
                if holder is not None and holder.get("token") != self.token:
                    self._lost = (f"pid {holder.get('pid')} on {holder.get('host')} took over the lease of "
                                  f"{self.url} (this run had not renewed it for {self.stale_s:.0f} s)")
                    return
                with self.fs.open(self.key, "wb") as f:
                    f.write(json.dumps(self._record()).encode())
            except Exception as e:  # noqa: BLE001 - a network error: retried at the next renewal
                print(f"warning: renewing the lease {self.url} failed ({type(e).__name__}: {e}); retrying",
                      file=sys.stderr)

    def check(self) -> None:
        """Raises LeaseLostError once another run has taken the lease over."""
        if self._lost:
            raise LeaseLostError(f"{self._lost}. This run stops without writing more. Fix: let one run use the "
                                 "workdir; if this one should go on, stop the other and run the same command again")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._lost:
            holder = _read(self.fs, self.key)
            if holder is not None and holder.get("token") == self.token:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self.key)


@contextlib.contextmanager
def workdir_lease(workdir, *, enabled: bool = True, take_over: bool = False, renew_s: float = RENEW_S,
                  stale_s: float = STALE_S):
    """Holds WORKDIR/.lease for the block -> the lease (call .check() before each write), or None when not
    `enabled` (the processes of a multi-process run other than its primary)."""
    if not enabled:
        yield None
        return
    lease = WorkdirLease(storage.path(workdir), renew_s=renew_s, stale_s=stale_s, take_over=take_over)
    lease.acquire(workdir)
    try:
        yield lease
    finally:
        lease.release()
