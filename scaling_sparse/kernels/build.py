"""Builds the CPU decode kernels: `python -m scaling_sparse.kernels.build` (`make install` runs it).

Compiles every `*.cc` next to this file (they include the `*.h` here) into `lib/libscaling_sparse_cpu.so` with g++ (C++17, -O3,
-march=native: the library is built for, and loaded on, the machine that runs it) against the XLA
FFI headers of the installed jaxlib (`jax.ffi.include_dir()`), and writes `lib/build_stamp.json`:
a hash of the sources, the jaxlib version and the flags, and the hash of the library it wrote. `cpu.py`
loads the library only when the stamp matches, so an edited source or an upgraded jaxlib falls back to
the JAX path (with the reason in `cpu.status()`) until this is run again, and a damaged library (its
bytes not the ones built) is never loaded. The library is written to a temporary name and renamed,
so a failed or interrupted build leaves the previous one intact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
LIB_DIR = HERE / "lib"
LIB_NAME = "libscaling_sparse_cpu.so"
STAMP_NAME = "build_stamp.json"
FLAGS = ("-std=c++17", "-O3", "-march=native", "-fPIC", "-shared", "-w")


def sources() -> list[pathlib.Path]:
    """The compiled sources (*.cc) and the headers they include (*.h): all of them are hashed."""
    return sorted(HERE.glob("*.cc")) + sorted(HERE.glob("*.h"))


def expected_stamp() -> dict:
    """What a current build's stamp holds (sources, jaxlib, flags): compared by cpu.py before loading."""
    import jaxlib

    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {"sources_sha256": digest.hexdigest(), "jaxlib": jaxlib.__version__, "flags": list(FLAGS)}


def read_stamp(lib_dir: pathlib.Path | None = None) -> dict | None:
    lib_dir = lib_dir or LIB_DIR
    try:
        stamp = json.loads((lib_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def up_to_date(lib_dir: pathlib.Path | None = None) -> bool:
    """The library exists and its stamp matches the current sources, jaxlib and flags."""
    lib_dir = lib_dir or LIB_DIR
    stamp = read_stamp(lib_dir)
    if stamp is None or "library_sha256" not in stamp or not (lib_dir / LIB_NAME).exists():
        return False  # (a stamp without the library's hash: an older build, made again)
    return {k: v for k, v in stamp.items() if k != "library_sha256"} == expected_stamp()


def up_to_date_and_intact(lib_dir: pathlib.Path | None = None) -> bool:
    """What `make install` asks before skipping a build: current, and its bytes the ones built."""
    return up_to_date(lib_dir) and library_intact(lib_dir)


def file_sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_intact(lib_dir: pathlib.Path | None = None) -> bool:
    """The library's bytes are the ones its build wrote (the stamp's hash). Checked before it is loaded:
    dlopen of a truncated library (a failed copy, a full disk) can kill the process with a bus error."""
    lib_dir = lib_dir or LIB_DIR
    stamp = read_stamp(lib_dir)
    try:
        return stamp is not None and stamp.get("library_sha256") == file_sha256(lib_dir / LIB_NAME)
    except OSError:
        return False


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(lib_dir: pathlib.Path = LIB_DIR, *, verbose: bool = True) -> pathlib.Path:
    """Compiles the kernels into lib_dir; returns the library path. Raises RuntimeError naming what is
    missing (no C++ compiler, a compile error)."""
    import jax

    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++); decoding uses the pure-JAX path")
    lib_dir.mkdir(parents=True, exist_ok=True)
    target = lib_dir / LIB_NAME
    with tempfile.NamedTemporaryFile(dir=lib_dir, suffix=".so.tmp", delete=False) as tmp:
        tmp_path = pathlib.Path(tmp.name)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", *(str(p) for p in sources() if p.suffix == ".cc"), "-o", str(tmp_path)]
    if verbose:
        print(" ".join(cmd), flush=True)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling the CPU kernels failed ({cxx}):\n{result.stderr[-4000:]}")
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)
    stamp_tmp = lib_dir / (STAMP_NAME + ".tmp")
    stamp_tmp.write_text(json.dumps({**expected_stamp(), "library_sha256": file_sha256(target)}, indent=1))
    os.replace(stamp_tmp, lib_dir / STAMP_NAME)
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--force", action="store_true", help="rebuild even when the library is up to date")
    args = p.parse_args(argv)
    if not args.force and up_to_date_and_intact():
        print(f"CPU kernels up to date: {LIB_DIR / LIB_NAME}")
        return 0
    try:
        path = build(verbose=not args.quiet)
    except RuntimeError as e:
        print(f"CPU kernels not built: {e}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
