"""Builds the CPU decode kernels: `python -m scaling_sparse.kernels.build` (`make install` runs it).

Compiles every `*.cc` next to this file (they include the `*.h` here) into `lib/libscaling_sparse_cpu.so` with g++ (C++17, -O3,
-march=native: the library is built for, and loaded on, the machine that runs it) against the XLA
FFI headers of the installed jaxlib (`jax.ffi.include_dir()`), and writes `lib/build_stamp.json`:
a hash of the sources, the jaxlib version and the flags, the CPU's instruction-set features, and the hash
of the library it wrote. `cpu.py` loads the library only when the stamp matches, so an edited source or an
upgraded jaxlib falls back to the JAX path (with the reason in `cpu.status()`) until this is run again,
and a damaged library (its bytes not the ones built) is never loaded. The library is written to a
temporary name and renamed, so a failed or interrupted build leaves the previous one intact.

`-march=native` makes the library use every instruction set of the machine that built it, so a library
built on an AVX-512 login node dies with an illegal instruction on an AVX2 compute node sharing its venv.
Each CPU therefore gets its own build: `lib/<machine>-<hash of its ISA features>/` (`host_lib_dir()`); a host
whose CPU has no build of its own decodes with the JAX path, and `cpu.status()` names the features it lacks.
Running this on each kind of host (a shared venv holds one build per kind) gives each its own.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
LIB_DIR = HERE / "lib"
LIB_NAME = "libscaling_sparse_cpu.so"
STAMP_NAME = "build_stamp.json"
FLAGS = ("-std=c++17", "-O3", "-march=native", "-fPIC", "-shared", "-w")
# The x86 /proc/cpuinfo flags that name instruction sets g++ may emit under -march=native (the rest, e.g.
# "hypervisor" or "constant_tsc", differ between hosts of one CPU model and must not split builds). On
# other architectures (aarch64's "Features") every listed feature is an instruction set.
_X86_ISA_PREFIXES = ("sse", "ssse", "pni", "avx", "amx", "fma", "f16c", "bmi", "abm", "lzcnt", "popcnt", "movbe",
                     "adx", "aes", "vaes", "pclmul", "vpclmul", "gfni", "sha", "rdrand", "rdseed", "xsave", "cx16",
                     "lahf", "3dnowprefetch", "clflushopt", "clwb", "clzero", "movdir", "serialize", "waitpkg",
                     "cldemote", "rdpid", "pku", "fsgsbase", "mwaitx", "tbm", "xop", "lwp", "mmx", "ptwrite",
                     "enqcmd", "uintr", "wbnoinvd", "avx_vnni", "tsxldtrk")


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """The instruction-set features of this host's CPU (Linux's /proc/cpuinfo; empty where there is none)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            names = value.split()
            if key.strip() == "flags":
                names = [n for n in names if n.startswith(_X86_ISA_PREFIXES)]
            return frozenset(names)
    return frozenset()


def host_key(features: frozenset[str] | None = None) -> str:
    """`<machine>-<12 hex digits>`: one per CPU instruction-set combination (the build directory's name)."""
    features = cpu_features() if features is None else features
    digest = hashlib.sha256(" ".join(sorted(features)).encode()).hexdigest()[:12]
    return f"{platform.machine() or 'unknown'}-{digest}"


def host_lib_dir(root: pathlib.Path | None = None) -> pathlib.Path:
    """Where this host's build lives: root (default lib/) / host_key()."""
    return (root or LIB_DIR) / host_key()


def missing_features(stamp: dict | None) -> list[str]:
    """The instruction-set features a build's stamp recorded that this host's CPU lacks (sorted)."""
    recorded = ((stamp or {}).get("cpu") or {}).get("features") or []
    return sorted(set(recorded) - cpu_features())


def other_builds(root: pathlib.Path | None = None) -> dict[str, dict]:
    """{directory name: stamp} of the builds under root made for other CPUs than this host's."""
    root, mine = root or LIB_DIR, host_key()
    found = {}
    for library in sorted(root.glob(f"*/{LIB_NAME}")):
        if library.parent.name != mine:
            found[library.parent.name] = read_stamp(library.parent) or {}
    return found


def sources() -> list[pathlib.Path]:
    """The compiled sources (*.cc) and the headers they include (*.h): all of them are hashed."""
    return sorted(HERE.glob("*.cc")) + sorted(HERE.glob("*.h"))


def expected_stamp() -> dict:
    """What a current build's stamp holds (sources, jaxlib, flags, this CPU): compared by cpu.py before loading."""
    import jaxlib

    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {"sources_sha256": digest.hexdigest(), "jaxlib": jaxlib.__version__, "flags": list(FLAGS),
            "cpu": {"machine": platform.machine(), "features": sorted(cpu_features())}}


def read_stamp(lib_dir: pathlib.Path | None = None) -> dict | None:
    lib_dir = lib_dir or host_lib_dir()
    try:
        stamp = json.loads((lib_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def up_to_date(lib_dir: pathlib.Path | None = None) -> bool:
    """The library exists and its stamp matches the current sources, jaxlib, flags and CPU."""
    lib_dir = lib_dir or host_lib_dir()
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
    lib_dir = lib_dir or host_lib_dir()
    stamp = read_stamp(lib_dir)
    try:
        return stamp is not None and stamp.get("library_sha256") == file_sha256(lib_dir / LIB_NAME)
    except OSError:
        return False


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(lib_dir: pathlib.Path | None = None, *, verbose: bool = True) -> pathlib.Path:
    """Compiles the kernels into lib_dir (default: this host's, host_lib_dir()); returns the library path.
    Raises RuntimeError naming what is missing (no C++ compiler, a compile error)."""
    import jax

    lib_dir = lib_dir or host_lib_dir()

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
    for legacy in (lib_dir.parent / LIB_NAME, lib_dir.parent / STAMP_NAME):  # the layout before host directories
        legacy.unlink(missing_ok=True)
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--force", action="store_true", help="rebuild even when the library is up to date")
    args = p.parse_args(argv)
    if not args.force and up_to_date_and_intact():
        print(f"CPU kernels up to date: {host_lib_dir() / LIB_NAME}")
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
