"""Atomic writes and fingerprints for the files cached under WORKDIR.

Every cached file is written to a temporary file in the same directory and moved into place with
os.replace, so a crash never leaves a half-written file that a later run would read. On object storage
(a gs:// or s3:// workdir) a file is one object written whole (storage.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import tempfile

import numpy as np

from scaling_sparse import storage


def fingerprint(obj) -> str:
    """A stable hex digest of any JSON-serialisable object (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic(path, write) -> None:
    if storage.is_object_store(path):  # an object is published whole: no temporary file to rename
        buffer = io.BytesIO()
        write(buffer)
        storage.path(path).write_bytes(buffer.getvalue())
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared workdir's cache from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def write_json(path, obj) -> None:
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path):
    return json.loads(storage.path(path).read_text())


def save_array(path, array: np.ndarray) -> None:
    _atomic(path, lambda f: np.save(f, array, allow_pickle=False))


def load_array(path) -> np.ndarray:
    return np.load(path, allow_pickle=False)
