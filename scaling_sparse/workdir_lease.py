"""One training run per object-store work directory: a lease object, WORKDIR/.lease (docs/storage.md).

Object stores have no locks that a dead process gives back, so the rule is a lease, and every change to
it is conditional on the generation (GCS's version number of an object) last seen, through
google-cloud-storage's `if_generation_match`:
  - taking it: created only if absent (generation 0): of two runs starting together exactly one gets
    it; the other is refused, naming the holder and how long ago it renewed;
  - holding it: rewritten every `renew_s` seconds (a thread), only if still at this run's generation.
    A failed precondition means another run took it over: the run is told at its next step (`check()`),
    before it writes metrics or a checkpoint. A run that could not renew for `stale_s` / 2 (the bucket
    unreachable) stops the same way, before another run may take it over;
  - a stale lease (not updated for `stale_s`, 10 minutes, by the bucket's clock; its run was killed or
    cut off), or any lease with train.take_over_lease=True, is taken over: deleted only at the generation
    read, then created again from generation 0 (of two runs taking it over together, one gets it);
  - the run ends (finished, stopped, or failed): the lease is deleted, only at this run's generation.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
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
    """Another run took this run's lease over, or this run could not renew it: it must write nothing more."""

    exit_code = 1


@functools.lru_cache(maxsize=1)
def _client():
    """google-cloud-storage (it comes with gcsfs): Application Default Credentials, or STORAGE_EMULATOR_HOST."""
    from google.cloud import storage as gcs

    return gcs.Client()


def _blob(url: str):
    bucket, _, name = url[len("gs://"):].partition("/")
    return _client().bucket(bucket).blob(name)


def _precondition_failed(error: Exception) -> bool:
    from google.api_core import exceptions

    return isinstance(error, (exceptions.PreconditionFailed, exceptions.NotFound))


class WorkdirLease:
    def __init__(self, workdir, *, renew_s: float = RENEW_S, stale_s: float = STALE_S, take_over: bool = False):
        storage.path(workdir)  # the package checks (gcsfs, s3:// refused)
        self.workdir = str(workdir).rstrip("/")
        self.url = f"{self.workdir}/{LEASE_FILE}"
        self.renew_s, self.stale_s, self.take_over = renew_s, stale_s, take_over
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.generation: int | None = None  # the lease's generation as this run last wrote it
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
                           "command": " ".join(sys.argv), "renewed_unix": time.time(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))}).encode()

    def _write(self, generation: int) -> bool:
        """Writes the lease if the object is at `generation` (0: absent) -> whether it did."""
        blob = _blob(self.url)
        try:
            blob.upload_from_string(self._record(), content_type="application/json", if_generation_match=generation)
        except Exception as e:  # noqa: BLE001 - a failed precondition is an answer; anything else is raised
            if _precondition_failed(e):
                return False
            raise
        self.generation = int(blob.generation)
        return True

    def _holder(self) -> tuple[dict, int, float] | None:
        """(the lease's content, its generation, seconds since the bucket last updated it), None if absent."""
        blob = _blob(self.url)
        try:
            blob.reload()
            raw = blob.download_as_bytes(if_generation_match=blob.generation)  # the version whose metadata we hold
        except Exception as e:  # noqa: BLE001
            if _precondition_failed(e):
                return None  # gone, or replaced while being read: the caller tries again
            raise
        try:
            content = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            content = {}
        age = (datetime.datetime.now(datetime.timezone.utc) - blob.updated).total_seconds()
        return content if isinstance(content, dict) else {}, int(blob.generation), age

    def acquire(self) -> None:
        for _ in range(5):  # a lease that vanishes or changes while it is read is read again
            if self._write(0):
                break
            held = self._holder()
            if held is None:
                continue
            holder, generation, age = held
            if holder.get("token") == self.token:  # our create went through, its reply was lost
                self.generation = generation
                break
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, lease "
                   f"renewed {age:.0f} s ago" if holder.get("token") else f"a lease of unknown content, {age:.0f} s old")
            if age < self.stale_s and not self.take_over:
                raise WorkdirBusyError(
                    f"{self.workdir} is in use by another training run ({who}). Two runs in one workdir would overwrite "
                    "each other's checkpoints and metrics. Fix: wait for it or stop it, or use another --workdir. A run "
                    f"that was killed leaves its lease: it is taken over {self.stale_s:.0f} s after its last renewal, or "
                    "at once with --config.train.take_over_lease=True when you know that run is dead")
            print(f"warning: taking over the lease of {self.workdir} ({who}): that run is taken to be dead",
                  file=sys.stderr)
            with contextlib.suppress(Exception):  # only at the generation read: another taker may be first
                _blob(self.url).delete(if_generation_match=generation)
        else:
            raise WorkdirBusyError(f"{self.workdir}: its lease kept changing while this run tried to take it (another "
                                   "run is taking it at the same moment). Fix: stop one of the two runs")
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name="workdir-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                if not self._write(self.generation):
                    self._lost = f"another run took over the lease of {self.workdir}"
                    return
                self._renewed = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the bucket unreachable: retried at the next renewal
                print(f"warning: renewing the lease {self.url} failed ({type(e).__name__}: {e}); retrying",
                      file=sys.stderr)

    def check(self) -> None:
        """Raises LeaseLostError once another run took the lease over or it could not be renewed for stale_s / 2."""
        unrenewed = time.monotonic() - self._renewed
        if not self._lost and unrenewed > self.stale_s / 2:
            self._lost = f"the lease of {self.workdir} could not be renewed for {unrenewed:.0f} s"
        if self._lost:
            raise LeaseLostError(f"{self._lost}: this run stops without writing more, so that two runs never write "
                                 "one workdir. Fix: let one run use the workdir; to go on with this one, make sure no "
                                 "other is running and run the same command again")

    def release(self) -> None:
        """Deletes the lease if it is still this run's; never raises (it runs while the run ends, maybe on an error)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.generation is None:
            return
        try:  # only at this run's generation: a lease another run took over stays theirs
            _blob(self.url).delete(if_generation_match=self.generation)
        except Exception as e:  # noqa: BLE001
            if not _precondition_failed(e):
                print(f"warning: the lease {self.url} could not be deleted ({type(e).__name__}: {e}); the next run "
                      f"takes it over {self.stale_s:.0f} s from now, or at once with "
                      "--config.train.take_over_lease=True", file=sys.stderr)


@contextlib.contextmanager
def workdir_lease(workdir, *, enabled: bool = True, take_over: bool = False, renew_s: float = RENEW_S,
                  stale_s: float = STALE_S):
    """Holds WORKDIR/.lease for the block -> the lease (call .check() before each write), or None when not
    `enabled` (the processes of a multi-process run other than its primary)."""
    if not enabled:
        yield None
        return
    lease = WorkdirLease(workdir, renew_s=renew_s, stale_s=stale_s, take_over=take_over)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()
