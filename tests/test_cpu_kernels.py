"""The compiled CPU decode kernels (scaling_sparse/kernels, docs/kernels.md) against the pure-JAX
path they replace: the sparse FFN kernel alone on random inputs, and whole models decoded with and
without the kernels (tokens equal, logits to rounding), for every variant with a sparse FFN. Skipped,
with the reason, where the kernels are not built; `make install` builds them."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import VARIANTS, make_model, random_tokens
from scaling_sparse.decode import Decoder
from scaling_sparse.kernels import build, cpu
from scaling_sparse.layers.sparse_ffn import SparseFF
from scaling_sparse.quantize import Int8Weight, quantize, quantize_model

needs_kernels = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels: {cpu.status()['reason']}")
SPARSE_FF_VARIANTS = sorted(name for name, fields in VARIANTS.items() if fields.get("ff_sparsity"))
# Every variant decodes one position's attention with the attention kernel; these also have sparse layers.
ALL_VARIANTS = sorted(VARIANTS)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 5)])
def test_sparse_ffn_kernel_equals_jax_decode(shape):
    ffn = SparseFF(48, 96, 8, lowrank=6, rngs=nnx.Rngs(shape[0] * 10 + shape[1]))
    # Controller weights large enough that the choices differ from token to token.
    ffn.c2[...] = ffn.c2[...] * 30
    x = jax.random.normal(jax.random.PRNGKey(sum(shape)), (*shape, 48))
    want, _ = ffn.decode(x, {}, 0)
    y, units = jax.jit(lambda x: cpu.sparse_ffn_decode(
        x, ffn.c1[...], ffn.c2[...], ffn.cb[...], ffn.w1[...], ffn.w2[...], ffn.b2[...], n_elements=8))(x)
    np.testing.assert_array_equal(units, ffn.choose(x))
    assert len(np.unique(np.asarray(units).reshape(-1, 12), axis=0)) > 1 or shape == (1, 1)
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 5)])
def test_int8_sparse_ffn_kernel_equals_jax_decode(shape):
    ffn = SparseFF(48, 96, 8, lowrank=6, rngs=nnx.Rngs(shape[0] * 10 + shape[1]))
    ffn.c2[...] = ffn.c2[...] * 30
    quantize_model(ffn)
    x = jax.random.normal(jax.random.PRNGKey(sum(shape)), (*shape, 48))
    want, _ = ffn.decode(x, {}, 0)  # the JAX path: int8 rows gathered, controller through quantize.matmul
    y, units = jax.jit(lambda x: cpu.sparse_ffn_decode_int8(
        x, *(w.get_value() for w in (ffn.c1, ffn.c2, ffn.cb, ffn.w1, ffn.w2, ffn.b2)), n_elements=8))(x)
    np.testing.assert_array_equal(units, ffn.choose(x))
    assert len(np.unique(np.asarray(units).reshape(-1, 12), axis=0)) > 1 or shape == (1, 1)
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_first_maximum_wins_ties():
    """Tied logits pick the first unit, as jnp.argmax: a controller of zeros ties every unit."""
    ffn = SparseFF(16, 32, 8, lowrank=4, rngs=nnx.Rngs(0))
    ffn.c1[...] = jnp.zeros_like(ffn.c1[...])
    ffn.cb[...] = jnp.zeros_like(ffn.cb[...])
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 16))
    y, units = cpu.sparse_ffn_decode(x, ffn.c1[...], ffn.c2[...], ffn.cb[...], ffn.w1[...], ffn.w2[...],
                                     ffn.b2[...], n_elements=8)
    np.testing.assert_array_equal(units, np.zeros((1, 1, 4)))
    np.testing.assert_allclose(y, ffn.decode(x, {}, 0)[0], atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_decoder_with_kernels_equals_jax_path(name):
    model = make_model(**VARIANTS[name])
    graphdef, params = nnx.split(model, nnx.Param)
    params = params.to_pure_dict()
    with_kernels = Decoder(graphdef, params, max_len=model.max_len)
    without = Decoder(graphdef, params, max_len=model.max_len, cpu_kernels=False)
    assert with_kernels.cpu_kernels and not without.cpu_kernels
    prompt = random_tokens(3, (2, 5))
    np.testing.assert_array_equal(with_kernels.generate(prompt, 10), without.generate(prompt, 10))
    # Logits of a prefill-sized decode call (5 tokens), traced with and without the kernels.
    def logits(use):
        f = lambda p, t, c: _decode_at(graphdef, p, t, c, 0, use=use)[0]
        return jax.jit(f)(params, prompt, model.init_cache(2, 16))
    np.testing.assert_allclose(logits(True), logits(False), atol=1e-4, rtol=1e-4)


@needs_kernels
def test_kernels_are_not_used_outside_a_decoder_or_when_switched_off():
    model = make_model(**VARIANTS["sparse_ff"])
    graphdef, params = nnx.split(model, nnx.Param)
    hlo = lambda use: jax.jit(lambda p, t, c: _decode_at(graphdef, p, t, c, 0, use=use)).lower(
        params.to_pure_dict(), random_tokens(0, (1, 1)), model.init_cache(1, 4)).as_text()
    assert cpu.FFN_TARGET in hlo(True)
    assert cpu.FFN_TARGET not in hlo(False)


@needs_kernels
def test_a_mesh_of_one_device_decodes_with_the_kernels():
    # The command line's generate holds its parameters on a 1x1x1 mesh: whole arrays, which the kernels take.
    from scaling_sparse.sharding import single_device_mesh

    model = make_model(**VARIANTS["sparse_ff"])
    graphdef, params = nnx.split(model, nnx.Param)
    assert Decoder(graphdef, params.to_pure_dict(), max_len=model.max_len, mesh=single_device_mesh()).cpu_kernels


def test_cpu_kernels_true_without_library_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cpu, "available", lambda: False)
    monkeypatch.setattr(cpu, "status", lambda: {"available": False, "reason": "not built (run make install)"})
    model = make_model(**VARIANTS["sparse_ff"])
    graphdef, params = nnx.split(model, nnx.Param)
    with pytest.raises(ValueError, match="not built"):
        Decoder(graphdef, params.to_pure_dict(), max_len=model.max_len, cpu_kernels=True)
    assert not Decoder(graphdef, params.to_pure_dict(), max_len=model.max_len).cpu_kernels


def test_switch_and_stale_build_fall_back_to_jax(tmp_path, monkeypatch):
    """SCALING_SPARSE_CPU_KERNELS=0 and a build whose stamp does not match the sources both report
    unavailable, with the reason, in a fresh process (status() is computed once per process)."""
    code = "import json; from scaling_sparse.kernels import cpu; print(json.dumps(cpu.status()))"
    env = dict(os.environ, **{cpu.ENV_SWITCH: "0"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["reason"].startswith("disabled")
    if not (build.host_lib_dir() / build.LIB_NAME).exists():
        pytest.skip("no built library to make stale")
    available_before = cpu.status()["available"]  # False when this run itself has the switch off
    stale = dict(build.expected_stamp(), sources_sha256="0" * 64)
    monkeypatch.delenv(cpu.ENV_SWITCH, raising=False)
    monkeypatch.setattr(build, "expected_stamp", lambda: stale)
    cpu.status.cache_clear()
    try:
        assert cpu.status()["reason"].startswith("stale build")
    finally:
        monkeypatch.undo()
        cpu.status.cache_clear()
        assert cpu.status()["available"] == available_before


def test_a_damaged_library_is_not_loaded_and_the_reason_is_given(tmp_path):
    """A truncated library (a failed copy, a full disk) with its stamp: dlopen of it could kill the process
    with a bus error, so status() compares its bytes with the stamp's hash first (in a fresh process)."""
    lib_dir = build.host_lib_dir(tmp_path)
    lib_dir.mkdir()
    (lib_dir / build.LIB_NAME).write_bytes(b"\x7fELF" + bytes(4000))
    (lib_dir / build.STAMP_NAME).write_text(json.dumps({**build.expected_stamp(), "library_sha256": "0" * 64}))
    code = ("import json, pathlib, sys; from scaling_sparse.kernels import build, cpu; "
            "build.LIB_DIR = pathlib.Path(sys.argv[1]); print(json.dumps(cpu.status()))")
    env = {k: v for k, v in os.environ.items() if k != cpu.ENV_SWITCH}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert not status["available"] and status["reason"].startswith("damaged library") and "--force" in status["reason"]


def test_a_build_for_another_cpu_is_never_loaded_and_the_reason_names_what_this_cpu_lacks(tmp_path, monkeypatch):
    """A venv shared by hosts of two CPUs (an AVX-512 login node, AVX2 compute nodes), with faked CPU
    features: -march=native code of the first would die with an illegal instruction on the second. Each
    CPU has its own build directory; a stamp's features are checked before loading (never loaded here)."""
    monkeypatch.delenv(cpu.ENV_SWITCH, raising=False)
    monkeypatch.setattr(build, "LIB_DIR", tmp_path)
    wide = frozenset({"sse2", "avx", "avx2", "fma", "avx512f", "avx512bw"})
    narrow = wide - {"avx512f", "avx512bw"}

    def write_build_on(features):  # what build() leaves, with a stand-in library
        monkeypatch.setattr(build, "cpu_features", lambda: features)
        lib_dir = build.host_lib_dir()
        lib_dir.mkdir()
        (lib_dir / build.LIB_NAME).write_bytes(b"\x7fELF" + bytes(100))
        stamp = {**build.expected_stamp(), "library_sha256": build.file_sha256(lib_dir / build.LIB_NAME)}
        (lib_dir / build.STAMP_NAME).write_text(json.dumps(stamp))
        return lib_dir

    def status_on(features):
        monkeypatch.setattr(build, "cpu_features", lambda: features)
        cpu.status.cache_clear()
        return cpu.status()

    try:
        wide_build = write_build_on(wide)
        status = status_on(narrow)
        assert not status["available"] and status["reason"].startswith("not built for this CPU"), status
        assert "instructions this one lacks (avx512bw, avx512f)" in status["reason"] and wide_build.name in status["reason"]
        assert not build.up_to_date() and build.host_lib_dir() != wide_build  # make install builds this host's own
        monkeypatch.setattr(build, "cpu_features", lambda: wide)
        assert build.up_to_date() and build.host_lib_dir() == wide_build  # the wide host keeps its own

        shutil.copytree(wide_build, tmp_path / build.host_key(narrow))
        status = status_on(narrow)  # copied by hand into the narrow host's directory
        assert status["reason"].startswith("built on a CPU with instructions this one lacks (avx512bw, avx512f)"), status
    finally:
        monkeypatch.undo()
        cpu.status.cache_clear()


@needs_kernels
@pytest.mark.parametrize("weights", ["float", "int8"])
@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_token_by_token_decode_with_kernels_equals_full_forward(name, weights):
    model = make_model(**VARIANTS[name])
    if weights == "int8":  # every matmul of the step through the int8 kernels (quantize.py)
        model = quantize_model(model)
    graphdef, state = nnx.split(model)
    tokens = random_tokens(4, (2, 9))
    full = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, mode="eval"))(state, tokens)
    step = jax.jit(lambda s, t, c, i: _decode_at(graphdef, s, t, c, i))
    cache, steps = model.init_cache(2, 12), []
    for i in range(tokens.shape[1]):
        logits, cache = step(state, tokens[:, i:i + 1], cache, jnp.int32(i))
        steps.append(logits)
    called = cpu.targets_in(step.lower(state, tokens[:, :1], cache, jnp.int32(0)).as_text())
    if weights == "int8":
        assert cpu.ATTENTION_TARGET in called and cpu.FFN_TARGET not in called and cpu.QKV_TARGET not in called
        assert (cpu.FFN_INT8_TARGET in called) == (name in SPARSE_FF_VARIANTS)
        assert (cpu.QKV_INT8_TARGET in called) == bool(VARIANTS[name].get("attn_sparsity"))
        assert cpu.INT8_IN_OUT_TARGET in called or cpu.INT8_OUT_IN_TARGET in called
    else:
        assert cpu.ATTENTION_TARGET in called and (cpu.FFN_TARGET in called) == (name in SPARSE_FF_VARIANTS)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows, k, n", [(1, 32, 64), (2, 37, 130), (5, 64, 300), (16, 576, 64), (1, 1024, 4000)])
def test_int8_matmul_kernels_equal_numpy(rows, k, n, transposed):
    rng = np.random.default_rng(rows * k + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = quantize(rng.standard_normal((n, k) if transposed else (k, n)).astype(np.float32), (1,) if transposed else (0,))
    q, scale = np.asarray(w.q, np.float64), np.asarray(w.scale, np.float64).reshape(-1)
    want = (x @ (q.T if transposed else q)) * scale
    got = jax.jit(lambda x: cpu.int8_matmul(x, w.q, w.scale.reshape(-1), transposed=transposed))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_kernels
@pytest.mark.parametrize("name", ["dense", "sparse_all"])
def test_an_int8_decode_step_makes_no_float32_copy_of_the_weights(name):
    """XLA's temporary buffers of one int8 decode step (docs/kernels.md, "int8 weights"): with the kernels
    they hold activations only, far less than the float32 size of the output layer, while the JAX path
    widens the weights into them."""
    model = quantize_model(make_model(**VARIANTS[name], vocab_size=4096, d_model=64, d_ff=256))
    graphdef, state = nnx.split(model)
    weights = [w for w in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, Int8Weight))
               if isinstance(w, Int8Weight)]

    def temp_bytes(use):
        step = jax.jit(lambda s, t, c, i: _decode_at(graphdef, s, t, c, i, use=use))
        compiled = step.lower(state, random_tokens(0, (1, 1)), model.init_cache(1, 12), jnp.int32(0)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    with_kernels, jax_path = temp_bytes(True), temp_bytes(False)
    largest = max(4 * w.size for w in weights)  # the output layer's [64, 4096] in float32: 1 MiB
    assert with_kernels < largest / 16 and with_kernels < jax_path / 10, (with_kernels, jax_path, largest)


def _decode_at(graphdef, state, tokens, cache, index, use=True):
    with cpu.use_kernels(use):
        return nnx.merge(graphdef, state).decode(tokens, cache, index)


@needs_kernels
@pytest.mark.parametrize("length_kernel", [1, 3])
# (d, modules): M = d / modules units per module picks the kernel's matmul path: 8 units Gemm (not a
# multiple of 16); 32 and 64 the 16-column strips (vector_ops.h StreamStrip16: AVX-512 tiles of up to 16
# modules, Gemm without AVX-512) with 9, 5, 16 (the medium size) and 17 modules (a 16-module tile and a
# 1-module remainder).
@pytest.mark.parametrize("d, modules", [(48, 6), (288, 9), (320, 5), (1024, 16), (544, 17)])
@pytest.mark.parametrize("weights", ["float", "int8"])
def test_sparse_qkv_kernel_equals_jax_decode(length_kernel, d, modules, weights):
    from scaling_sparse.layers.sparse_qkv import SparseQKV

    qkv = SparseQKV(d, modules, length_kernel=length_kernel, rngs=nnx.Rngs(length_kernel))
    if weights == "int8":  # the JAX path (quantize.matmul) against ScalingSparseQkvDecodeInt8
        quantize_model(qkv)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 1, d))
    cache = {"history": jax.random.normal(jax.random.PRNGKey(1), (3, length_kernel - 1, modules, d // modules))}
    want, want_cache = qkv.decode(x, cache, 0)

    def with_kernels(x, cache):
        with cpu.use_kernels(True):
            return qkv.decode(x, cache, 0)

    assert (cpu.QKV_INT8_TARGET if weights == "int8" else cpu.QKV_TARGET) in cpu.targets_in(
        jax.jit(with_kernels).lower(x, cache).as_text())
    got, got_cache = jax.jit(with_kernels)(x, cache)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_cache["history"], want_cache["history"], atol=1e-5, rtol=1e-5)


def _cache_with_step(seed, n, dh, length):
    """Random caches k_t [n, dh, L], v [n, L, dh] and one position's query, key and value
    [b=1, 1, n heads, dh]."""
    rng = np.random.default_rng(seed)
    q, k, vals = (jnp.asarray(rng.standard_normal((1, 1, n, dh)), jnp.float32) for _ in range(3))
    k_t = jnp.asarray(rng.standard_normal((n, dh, length)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((n, length, dh)), jnp.float32)
    return q, k, vals, k_t, v


@needs_kernels
@pytest.mark.parametrize("position", [0, 1, 6, 11])
@pytest.mark.parametrize("core", ["dot_product", "lsh"])
def test_attention_kernel_equals_jax_cache_update_and_attention(position, core):
    """One query at `position` over a 12-long cache: the kernel writes the step's key and value into the
    caches exactly where update_cache does (every other entry unchanged) and attends as the JAX path;
    positions after it are ignored (their cache rows hold random values here, not zeros), LSH's
    self-mask leaves the query itself only at position 0."""
    from scaling_sparse.layers import attention, lsh

    q, k, vals, k_t, v = _cache_with_step(position, 6, 8, 12)
    q_pos = jnp.asarray([position], jnp.int32)
    scoring = lsh.LSHAttention(chunk_len=4).cache_scoring() if core == "lsh" else {"scale": 8 ** -0.5}

    def with_jax(q, k, vals, k_t, v, q_pos):
        k_t, v = attention.update_cache(k_t, v, k, vals, q_pos[0])
        if core == "lsh":
            return lsh.attend_cache(q, k_t, v, q_pos), k_t, v
        return attention.cached_attention(q, k_t, v, q_pos, **scoring), k_t, v

    def with_kernel(q, k, vals, k_t, v, q_pos):
        return attention.attention_kernel(q, k, vals, k_t, v, q_pos, **scoring)

    args = (q, k, vals, k_t, v, q_pos)
    assert cpu.targets_in(jax.jit(with_kernel).lower(*args).as_text()) == [cpu.ATTENTION_TARGET]
    assert cpu.targets_in(jax.jit(with_jax).lower(*args).as_text()) == []
    (got, got_k, got_v), (want, want_k, want_v) = jax.jit(with_kernel)(*args), jax.jit(with_jax)(*args)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if position == 0:  # only the query itself is visible: the output is its own value
        np.testing.assert_allclose(got[0, 0], vals[0, 0], atol=1e-6)


@needs_kernels
def test_attention_kernel_updates_donated_caches_in_place():
    """The caches are aliased to the kernel's results: with donated caches XLA passes the same buffers
    back (no copy of the whole cache per layer and token)."""
    from scaling_sparse.layers import attention

    q, k, vals, k_t, v = _cache_with_step(0, 4, 8, 16)
    step = jax.jit(lambda k_t, v: attention.attention_kernel(q, k, vals, k_t, v, jnp.asarray([3]), scale=1.0),
                   donate_argnums=(0, 1))
    k_pointer, v_pointer = k_t.unsafe_buffer_pointer(), v.unsafe_buffer_pointer()
    _, k_t, v = step(k_t, v)
    assert (k_t.unsafe_buffer_pointer(), v.unsafe_buffer_pointer()) == (k_pointer, v_pointer)
    np.testing.assert_array_equal(k_t[:, :, 3], k[0, 0])


@needs_kernels
def test_attention_kernel_rejects_a_position_outside_the_cache():
    q, k, vals, k_t, v = _cache_with_step(0, 2, 4, 5)
    with pytest.raises(Exception, match="index outside the cache"):
        jax.block_until_ready(cpu.cached_attention_decode(q[0, 0], k[0, 0], vals[0, 0], k_t, v, 5, scale=1.0))


# The three kernels on shapes that split into many tasks, their outputs hashed (run in a subprocess).
_CORE_COUNT_PROBE = """
import hashlib, numpy as np, jax.numpy as jnp
from scaling_sparse.kernels import cpu
assert cpu.available(), cpu.status()
r = np.random.default_rng(0)
f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
d, rank, blocks, n, modules, m = 256, 32, 32, 8, 4, 64
outs = cpu.sparse_ffn_decode(f(1, d), f(d, rank), f(rank, blocks, n), f(blocks, n), f(blocks, n, d), f(blocks, n, d),
                             f(d), n_elements=n)
conv = lambda: (f(3, 3, m, m), f(m))
outs += cpu.sparse_qkv_decode(f(1, d), f(modules, d), f(d, m), f(d), f(1, 2, modules, m), conv(), conv(), conv())[0]
outs += cpu.cached_attention_decode(f(16, 32), f(16, 32), f(16, 32), f(16, 32, 40), f(16, 40, 32), 20, scale=0.2)
print(hashlib.sha256(b"".join(np.asarray(o).tobytes() for o in outs)).hexdigest())
"""


@needs_kernels
@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and 2 cores")
def test_kernel_results_do_not_depend_on_the_number_of_cores():
    """The kernels' tasks are claimed by as many workers as XLA's pool has threads (parallel.h); the task
    split, and so every sum's order, is fixed (cpu.PARTS): 1 and 2 cores give the same bits."""
    env = {k: v for k, v in os.environ.items() if k != cpu.ENV_SWITCH}
    digests = []
    for cores in ("0", "0,1"):
        out = subprocess.run(["taskset", "-c", cores, sys.executable, "-c", _CORE_COUNT_PROBE], env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        digests.append(out.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]


@needs_kernels
@pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler")
def test_an_avx2_only_build_passes_the_kernel_checks(tmp_path):
    """The kernels built without AVX-512 (-mno-avx512f: the code of CPUs such as AMD Zen 3, whatever this host
    has) and checked against the JAX path, float and int8, in a subprocess (tests/avx2_build_check.py)."""
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).parent / "avx2_build_check.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["status"]["available"], report["status"]
    if report["zmm_instructions"] is not None:  # objdump present: really no 512-bit code, and AVX2 code
        assert report["zmm_instructions"] == 0 and report["ymm_instructions"] > 0
    for check, error in report["errors"].items():
        assert error < 1e-5, (check, error)
    for name, runs in report["tokens"].items():
        assert runs["used_kernels"] and runs["kernels"] == runs["jax"], name
