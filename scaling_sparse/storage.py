"""Where a work directory lives: local disk, or Google Cloud Storage given as a gs:// URL (docs/storage.md).

    path(workdir)          pathlib.Path for a local path (local runs are unchanged), etils.epath.Path for a
                           gs:// URL (served by fsspec's gcsfs); both take / and the usual
                           read_text, write_bytes, exists, glob, iterdir, mkdir, unlink, rmtree
    is_object_store(p)     whether p is an object-store URL (gs://, or s3://, refused with a message)
    write_atomic(p, data)  readers see the old content or the new, never part of it
    local_mirror(p)        a local directory mirroring p (memory-mapped caches need a file on disk)

Object stores have no rename and no append: an object written in one request is published whole (a
reader sees the old object or the new one), so an atomic write is one write there; files that grow
(metrics.jsonl) are rewritten whole. epath is told to use fsspec (EPATH_USE_TF=false) before the first URL
is opened: with TensorFlow installed it would use TF's gfile, which configures GCS its own way and
imports TensorFlow into every run with a bucket workdir.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

OBJECT_STORE_PREFIXES = ("gs://", "s3://")
_PACKAGES = {"gs://": ("gcsfs", "gcsfs")}


class StorageError(RuntimeError):
    """An object-store URL that cannot be used (a missing package, s3://)."""

    exit_code = 2


def is_object_store(p) -> bool:
    return str(p).startswith(OBJECT_STORE_PREFIXES)


def path(p):
    """pathlib.Path for a local path, etils.epath.Path for a gs:// URL (also given as such a path)."""
    if not is_object_store(p):
        return pathlib.Path(p)
    url = str(p)
    if url.startswith("s3://"):
        raise StorageError(
            f"{url}: work directories on S3 are not supported yet. orbax-checkpoint (which writes the checkpoints) "
            "builds TensorStore paths for gs:// only and turns s3:// into a relative path. Fix: use a gs:// bucket, "
            "or mount the S3 bucket (mountpoint-s3, s3fs-fuse) and give the mount's local path")
    module, package = _PACKAGES[url[:5]]
    try:
        __import__(module)
    except ImportError:
        raise StorageError(f"{url} is on object storage, which needs the {package} package. Fix: pip install "
                           "'scaling-sparse[cloud]'") from None
    configure_fsspec()
    from etils import epath

    return epath.Path(url)


def _epath_without_tensorflow() -> None:
    """epath serves URLs through fsspec, not TensorFlow's gfile (the module docstring). It reads EPATH_USE_TF
    once, at its first path of any kind (TFDS makes local ones), and caches the answer: the cache is cleared
    here so the setting holds whatever ran first."""
    os.environ.setdefault("EPATH_USE_TF", "false")
    from etils.epath import gpath

    cached = getattr(gpath, "_is_tf_installed", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


_configured = False


def configure_fsspec() -> None:
    """Once per process, before the first URL: epath without TensorFlow, and fsspec with no cached listings
    (fsspec's filesystems remember what a directory held, gcsfs forever by default, so a process would not
    see an object another one wrote: a lease, a checkpoint, metrics). Options the user set in fsspec's
    config win."""
    global _configured
    if _configured:
        return
    _configured = True
    _epath_without_tensorflow()
    import logging

    import fsspec.config

    for name in ("fsspec", "gcsfs", "s3fs"):  # their INFO records (a read-ahead cache per opened file) are noise here
        logging.getLogger(name).setLevel(logging.WARNING)
    for protocol, options in (("gs", {"cache_timeout": 0}), ("gcs", {"cache_timeout": 0}),
                              ("s3", {"use_listings_cache": False})):
        for key, value in options.items():
            fsspec.config.conf.setdefault(protocol, {}).setdefault(key, value)


def write_atomic(p, data: str | bytes) -> None:
    """Writes `data` to `p` so that a crash leaves the old content or the new one: a temporary file renamed
    over it on disk, one write on object storage (an object is published whole)."""
    p = path(p)
    raw = data.encode() if isinstance(data, str) else data
    if is_object_store(p):
        p.write_bytes(raw)
        return
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(raw)
    tmp.replace(p)


def local_mirror(p) -> pathlib.Path:
    """A local directory standing for the object-store directory `p` (a local path is itself): data caches
    are memory-mapped, which needs files on disk. Under $SCALING_SPARSE_CACHE (default
    ~/.cache/scaling_sparse/object_store), one directory per URL."""
    if not is_object_store(p):
        return pathlib.Path(p)
    root = pathlib.Path(os.environ.get("SCALING_SPARSE_CACHE", pathlib.Path.home() / ".cache" / "scaling_sparse"))
    url = str(p).rstrip("/")
    name = url.split("://", 1)[1].replace("/", "_")[-60:] + "-" + hashlib.sha256(url.encode()).hexdigest()[:12]
    mirror = root / "object_store" / name
    mirror.mkdir(parents=True, exist_ok=True)
    return mirror


def download(source, dest: pathlib.Path) -> None:
    """Copies object `source` to the local file `dest` atomically (a temporary file renamed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as f:
        f.write(path(source).read_bytes())
    os.replace(f.name, dest)


def move_tree(source, dest) -> None:
    """Moves the directory `source` to `dest` (absent): a rename on disk; on object storage a copy of its
    objects, then their removal (a crash between leaves both copies, never neither)."""
    if not is_object_store(source):
        pathlib.Path(source).rename(dest)
        return
    import fsspec

    fs, src = fsspec.core.url_to_fs(str(source))
    dst = fsspec.core.url_to_fs(str(dest))[1]
    fs.copy(src.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)
    fs.rm(src, recursive=True)


def remove_tree(p) -> None:
    """Removes the directory `p` and everything under it, if present."""
    p = path(p)
    if is_object_store(p):
        if p.exists():
            p.rmtree()
        return
    import shutil

    shutil.rmtree(p, ignore_errors=True)
