"""Loads the compiled CPU decode kernels (docs/kernels.md) and says when decoding uses them.

`status()`: whether the library is loaded, and if not why (not built, built only for other CPUs, built on a
CPU with instructions this one lacks, stale build, damaged library, disabled by SCALING_SPARSE_CPU_KERNELS=0,
a load error). Nothing here needs the library to import, so GPU images
and machines without a compiler run the pure-JAX path.

Whether a traced decode uses a kernel is decided when it is traced: `Decoder` traces its functions
inside `use_kernels(True)` when it runs on the CPU backend, unsharded, with the library loaded
(`decode.Decoder.cpu_kernels`); layers ask `active()`. Eval, training and everything traced outside
that context run the JAX path.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from scaling_sparse.kernels import build

ENV_SWITCH = "SCALING_SPARSE_CPU_KERNELS"  # "0" disables the kernels
FFN_TARGET = "scaling_sparse_ffn_decode"
FFN_INT8_TARGET = "scaling_sparse_ffn_decode_int8"
QKV_TARGET = "scaling_sparse_qkv_decode"
QKV_INT8_TARGET = "scaling_sparse_qkv_decode_int8"
ATTENTION_TARGET = "scaling_sparse_cached_attention_decode"
INT8_IN_OUT_TARGET = "scaling_sparse_int8_matmul_in_out"  # int8 weights (quantize.py): x @ q [K, N] * scale
INT8_OUT_IN_TARGET = "scaling_sparse_int8_matmul_out_in"  # x @ q [N, K].T * scale
TARGETS = (FFN_TARGET, FFN_INT8_TARGET, QKV_TARGET, QKV_INT8_TARGET, ATTENTION_TARGET, INT8_IN_OUT_TARGET, INT8_OUT_IN_TARGET)
# int8 matmuls with more rows than this (a long prefill) take the JAX path: the kernel re-reads the weights
# for every 4 rows, XLA's float32 copy is paid once per call.
INT8_KERNEL_ROWS = 32
# Each kernel splits its work (the FFN's C1 rows and blocks, QKV's modules and columns, attention's head rows) into
# this many tasks on XLA's intra-op thread pool; the calling thread runs any task a pool thread has not
# started. 2 uses both cores of the benchmark machine. A fixed count fixes the order of the partial sums,
# so results do not depend on the machine's thread count.
PARTS = 2

_active = contextvars.ContextVar("scaling_sparse_cpu_kernels", default=False)


@functools.lru_cache(maxsize=1)
def status() -> dict:
    """{"available": bool, "reason": str, "library": path or None}; loads and registers the kernels once."""
    path = build.host_lib_dir() / build.LIB_NAME
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return {"available": False, "reason": f"disabled ({ENV_SWITCH}=0)", "library": None}
    if not path.exists():
        others = build.other_builds()
        if others:  # a venv shared with hosts of another CPU (a login node and compute nodes)
            lacks = sorted({f for stamp in others.values() for f in build.missing_features(stamp)})
            return {"available": False, "reason": f"not built for this CPU ({build.host_key()}): the builds in "
                    f"{build.LIB_DIR} are for other CPUs ({', '.join(others)})"
                    + (f", built with instructions this one lacks ({_listed(lacks)})" if lacks else "")
                    + "; run `python -m scaling_sparse.kernels.build` on this host to add its own", "library": None}
        return {"available": False, "reason": "not built (run `make install` or `python -m "
                "scaling_sparse.kernels.build`)", "library": None}
    lacks = build.missing_features(build.read_stamp())
    if lacks:  # a library copied in from another host: loading it could die with an illegal instruction
        return {"available": False, "reason": f"built on a CPU with instructions this one lacks ({_listed(lacks)}): "
                "not loaded; rebuild it here with `python -m scaling_sparse.kernels.build --force`",
                "library": str(path)}
    if not build.up_to_date():
        return {"available": False, "reason": "stale build (sources, jaxlib, flags or the stamp's format changed "
                "since it was built: run `python -m scaling_sparse.kernels.build`)", "library": str(path)}
    if not build.library_intact():
        return {"available": False, "reason": "damaged library (its bytes differ from the ones its build wrote: a "
                "failed copy or a full disk?): rebuild it with `python -m scaling_sparse.kernels.build --force`",
                "library": str(path)}
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(FFN_TARGET, jax.ffi.pycapsule(lib.ScalingSparseFfnDecode), platform="cpu")
        jax.ffi.register_ffi_target(FFN_INT8_TARGET, jax.ffi.pycapsule(lib.ScalingSparseFfnDecodeInt8), platform="cpu")
        jax.ffi.register_ffi_target(QKV_INT8_TARGET, jax.ffi.pycapsule(lib.ScalingSparseQkvDecodeInt8), platform="cpu")
        jax.ffi.register_ffi_target(QKV_TARGET, jax.ffi.pycapsule(lib.ScalingSparseQkvDecode), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.ScalingSparseCachedAttentionDecode),
                                    platform="cpu")
        jax.ffi.register_ffi_target(INT8_IN_OUT_TARGET, jax.ffi.pycapsule(lib.ScalingSparseInt8MatmulInOut),
                                    platform="cpu")
        jax.ffi.register_ffi_target(INT8_OUT_IN_TARGET, jax.ffi.pycapsule(lib.ScalingSparseInt8MatmulOutIn),
                                    platform="cpu")
    except (OSError, AttributeError, ValueError, RuntimeError) as e:
        return {"available": False, "reason": f"load failed: {e}", "library": str(path)}
    return {"available": True, "reason": "loaded", "library": str(path)}


def _listed(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def available() -> bool:
    return status()["available"]


@contextlib.contextmanager
def use_kernels(on: bool):
    """Layers traced inside this context use the kernels when `on` (and they are available)."""
    token = _active.set(bool(on) and available())
    try:
        yield
    finally:
        _active.reset(token)


def active() -> bool:
    """True while tracing inside use_kernels(True) with the library loaded."""
    return _active.get()


def targets_in(program_text: str) -> list[str]:
    """The kernels a lowered program calls (text of `jax.jit(f).lower(...)`): what a benchmark
    reports as the decode path actually taken, whatever was asked for."""
    called = set(re.findall(r"custom_call @(\w+)", program_text))
    return [target for target in TARGETS if target in called]


def sparse_ffn_decode(x, c1, c2, cb, w1, w2, b2, *, n_elements: int):
    """The sparse FFN's decode (layers/sparse_ffn.py `SparseFF.decode`) as one kernel call.

    x [..., d]; c1 [d, r]; c2 [r, B, N]; cb [B, N]; w1, w2 [B, N, d]; b2 [d], all float32.
    Returns (y [..., d], units [..., B] int32: the unit chosen in each block)."""
    lead, d = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    f = w1.shape[0] * w1.shape[1]
    blocks = f // n_elements
    y, units = jax.ffi.ffi_call(
        FFN_TARGET,
        (jax.ShapeDtypeStruct((rows, d), jnp.float32), jax.ShapeDtypeStruct((rows, blocks), jnp.int32)),
    )(x.reshape(rows, d), c1, c2.reshape(c2.shape[0], f), cb.reshape(f), w1.reshape(f, d), w2.reshape(f, d), b2,
      n_elements=np.int64(n_elements), parts=np.int64(PARTS))
    return y.reshape(*lead, d), units.reshape(*lead, blocks)


def sparse_ffn_decode_int8(x, c1, c2, cb, w1, w2, b2, *, n_elements: int):
    """sparse_ffn_decode with int8 weights (quantize.Int8Weight c1, c2, w1, w2: a scale per output channel of
    the controller's factors, per row of the [B, N, d] stores), read as int8 by the kernel."""
    lead, d = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    f = w1.q.shape[0] * w1.q.shape[1]
    blocks = f // n_elements
    y, units = jax.ffi.ffi_call(
        FFN_INT8_TARGET,
        (jax.ShapeDtypeStruct((rows, d), jnp.float32), jax.ShapeDtypeStruct((rows, blocks), jnp.int32)),
    )(x.reshape(rows, d), c1.q, c1.scale.reshape(-1), c2.q.reshape(c2.q.shape[0], f), c2.scale.reshape(f),
      cb.reshape(f), w1.q.reshape(f, d), w1.scale.reshape(f), w2.q.reshape(f, d), w2.scale.reshape(f), b2,
      n_elements=np.int64(n_elements), parts=np.int64(PARTS))
    return y.reshape(*lead, d), units.reshape(*lead, blocks)


def sparse_qkv_decode(x, gates, kernel, bias, history, conv_q, conv_k, conv_v):
    """Sparse QKV's decode of one new position (layers/sparse_qkv.py `SparseQKV.decode`) as one call.

    x [b, d]; gates [S, d]; kernel [d, M]; bias [d]; history [b, kl-1, S, M]; conv_* = (kernel
    [kl, ks, M, M], bias [M]), all float32. Returns (q, k, v) each [b, d] and the new history."""
    b, d = x.shape
    out = jax.ShapeDtypeStruct((b, d), jnp.float32)
    q, k, v, new_history = jax.ffi.ffi_call(
        QKV_TARGET, (out, out, out, jax.ShapeDtypeStruct(history.shape, jnp.float32)),
    )(x, gates, kernel, bias, history, *conv_q, *conv_k, *conv_v, parts=np.int64(PARTS))
    return (q, k, v), new_history


def sparse_qkv_decode_int8(x, gates, kernel, bias, history, conv_q, conv_k, conv_v):
    """sparse_qkv_decode with int8 weights (quantize.Int8Weight gates [S, d] with a scale per row, kernel [d, M]
    with a scale per column, conv kernels [kl, ks, M, M] with a scale per output channel; biases float32)."""
    b, d = x.shape
    out = jax.ShapeDtypeStruct((b, d), jnp.float32)
    convs = [a for w, bias_c in (conv_q, conv_k, conv_v) for a in (w.q, w.scale.reshape(-1), bias_c)]
    q, k, v, new_history = jax.ffi.ffi_call(
        QKV_INT8_TARGET, (out, out, out, jax.ShapeDtypeStruct(history.shape, jnp.float32)),
    )(x, gates.q, gates.scale.reshape(-1), kernel.q, kernel.scale.reshape(-1), bias, history, *convs,
      parts=np.int64(PARTS))
    return (q, k, v), new_history


def cached_attention_decode(q, k_new, v_new, k_t, v, index, *, scale: float, self_value: float | None = None):
    """One query position's cache update and attention over the decode caches (layers/attention.py
    `update_cache` then `cached_attention`, or layers/lsh.py `attend_cache`) as one call.

    q, k_new, v_new [n, dh] (n = batch x heads): the query, key and value at position `index`; k_t
    [n, dh, L], v [n, L, dh]: the caches, returned with k_new and v_new written at `index` (aliased, so
    XLA updates donated caches in place); positions after `index` are masked; `self_value`: the score
    that replaces the query's own (LSH's self-mask), None for none. Returns (o [n, dh], k_t, v), float32."""
    return jax.ffi.ffi_call(ATTENTION_TARGET, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                               jax.ShapeDtypeStruct(k_t.shape, jnp.float32),
                                               jax.ShapeDtypeStruct(v.shape, jnp.float32)),
                            input_output_aliases={3: 1, 4: 2})(
        q, k_new, v_new, k_t, v, jnp.asarray(index, jnp.int32), scale=np.float32(scale),
        self_mask=self_value is not None, self_value=np.float32(0.0 if self_value is None else self_value),
        parts=np.int64(PARTS))


def int8_matmul(x, q, scale, *, transposed: bool = False):
    """x [..., K] float32 times int8 weights (quantize.py) as one kernel call, reading each weight byte once.

    transposed=False: q [K, N] with scale [N] (a scale per output channel) -> x @ q * scale;
    transposed=True:  q [N, K] with scale [N] (a scale per row) -> x @ q.T * scale. Returns [..., N] float32."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    n = q.shape[0] if transposed else q.shape[1]
    y = jax.ffi.ffi_call(INT8_OUT_IN_TARGET if transposed else INT8_IN_OUT_TARGET,
                         jax.ShapeDtypeStruct((rows, n), jnp.float32))(
        x.reshape(rows, k), q, scale.reshape(n), parts=np.int64(PARTS))
    return y.reshape(*lead, n)
