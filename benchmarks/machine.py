"""What machine a benchmark ran on, its measured memory bandwidth and its measured matmul rate.

Unbatched decoding is memory-bound, so every latency figure is read against the bandwidth measured
here, on the same device, in the same process: a large array copy (bytes read + bytes written over
time) under jax.jit, so it goes through the same runtime as the model. Training is compute-bound,
so training-step FLOP rates are read against a square matmul timed the same way
(`measure_matmul_peak`).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp


def machine_info() -> dict:
    """Host, device and library versions, for the JSON file."""
    import flax
    import numpy as np

    uname = platform.uname()
    devices = jax.devices()
    info = {
        "platform": jax.default_backend(),
        "processor": platform.processor() or uname.machine,
        # The CPU's model name: decode latency depends on it (caches, AVX-512 in the CPU kernels), and
        # one VM's "x86_64" may be an AMD EPYC one day and an Intel Xeon the next.
        "cpu_model": cpu_model(),
        "uname": f"{uname.system} {uname.release} {uname.machine}",
        "hostname": uname.node,
        "cpu_count": os.cpu_count(),
        "host_memory_bytes": host_memory_bytes(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        "device_count": len(devices),
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": _jaxlib_version(),
                     "flax": flax.__version__, "numpy": np.__version__},
    }
    limit = device_memory_bytes()
    if limit:
        info["device_memory_bytes"] = limit
    return info


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_kind(backend: str | None = None) -> str:
    """"cpu" or "gpu" (any GPU backend), naming the result files; other backends as they are."""
    backend = backend or jax.default_backend()
    return "cpu" if backend == "cpu" else "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def _jaxlib_version() -> str:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return "unknown"


def host_memory_bytes(available: bool = False) -> int:
    """Total (or currently available) host memory; 0 when the OS does not say."""
    key = "MemAvailable:" if available else "MemTotal:"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES" if available else "SC_PHYS_PAGES")
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def device_memory_bytes() -> int:
    """Memory of the first accelerator (its allocator's limit); 0 on CPU or when unknown."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return 0
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not implement memory_stats
        return 0
    return int(stats.get("bytes_limit", 0))


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 10, dtype=jnp.float32) -> dict:
    """Copy bandwidth in GB/s (1e9 bytes) of an `nbytes` array, plus a read-only figure.

    copy: `x + 1` with x donated, so XLA writes in place: each call reads and writes nbytes,
    GB/s = 2 * nbytes / time. (Without donation every call allocates a fresh output and the
    page faults of first touch, not the memory, set the time: 3 GB/s instead of 28 on a 2-core VM.)
    read: `x.sum()`, nbytes / time (what a weight-streaming decode step mostly does).
    Medians over `repeats` after one warm-up (compilation) call; the best figures too.
    """
    itemsize = jnp.dtype(dtype).itemsize
    n = max(nbytes // itemsize, 1)
    x = jnp.ones((n,), dtype)
    copy = jax.jit(lambda a: a + jnp.asarray(1, a.dtype), donate_argnums=0)
    read = jax.jit(lambda a: a.sum(dtype=jnp.float32))
    x = copy(x).block_until_ready()
    read(x).block_until_ready()
    copy_rates, read_rates = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        x = copy(x).block_until_ready()
        copy_rates.append(2 * n * itemsize / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        read(x).block_until_ready()
        read_rates.append(n * itemsize / (time.perf_counter() - start) / 1e9)
    del x
    return {"gb_per_s": statistics.median(copy_rates), "best_gb_per_s": max(copy_rates),
            "read_gb_per_s": statistics.median(read_rates), "best_read_gb_per_s": max(read_rates),
            "array_bytes": int(n * itemsize), "repeats": repeats,
            "method": "jit(x + 1), x donated: (bytes read + bytes written) / time; read: jit(x.sum())"}


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 10, seed: int = 0) -> dict:
    """The machine's achievable matmul rate: FLOP/s of one jitted [n, n] x [n, n] product in `dtype`
    (2 n^3 FLOPs, float32 accumulation as XLA chooses), median over `repeats` after one warm-up
    (compilation) call; the best figure too. Training-step FLOP rates are read against it
    (benchmarks/train_throughput.py), measured in the same process on the same device."""
    dtype = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    flops = 2.0 * n ** 3
    del a, b
    return {"flops_per_s": flops / statistics.median(times), "best_flops_per_s": flops / min(times),
            "n": n, "dtype": dtype.name, "repeats": repeats, "seconds": times,
            "method": "jit(a @ b), [n, n] x [n, n]: 2 n^3 FLOPs / time, median over repeats after a warm-up"}
