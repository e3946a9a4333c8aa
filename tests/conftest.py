import os
import shutil
import tempfile

import pytest

# Tests run on the CPU, offline, on 2 cores.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Compile fast, run slower: the suite's tiny programs run in milliseconds, but XLA compiling them is most of
# its time on 2 cores. LLVM at -O0 and XLA's older CPU emitters (not its fusion emitters) compile the tiny
# Terraformer encoder-decoder's train step in 4.1 s instead of 18.8 s; its sharded-equivalence subprocess
# runs in 1:50 instead of 3:00 (-O0 alone). Numerics agree to float tolerance (the tests' tolerances are
# unchanged). Subprocesses inherit the flags; tests that start one with more flags add theirs with
# `xla_flags(...)`. Benchmarks and users compile with XLA's defaults.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a subprocess: the test session's, plus `flags`."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


# One JAX persistent compilation cache for the whole test session: the same tiny programs (the tiny
# preset's train step, eval step, decode loop) would otherwise compile again in each xdist worker, in
# each test that jits them anew and in every `python -m scaling_sparse` subprocess a test starts. The
# controller process makes the folder before the workers start; the workers and every subprocess inherit
# it through the environment, and the controller removes it at the end (pytest_unconfigure). Programs
# that compile in under 0.2 s are not worth a file. A cache the caller set (JAX_COMPILATION_CACHE_DIR) is
# used as it is.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="scaling_sparse_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """With `--dist loadgroup` every xdist_group test's id must carry its group (xdist adds "@group" in each
    worker): otherwise the groups are ignored and their shared subprocesses and training runs are made once
    per worker, the suite's time nearly doubled without a word."""
    if not getattr(config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group")
            and item.nodeid.rfind("@") < item.nodeid.rfind("]") + 1]  # xdist's own test: "@group" after the params
    if lost:
        raise pytest.UsageError(f"pytest-xdist's --dist loadgroup did not group {len(lost)} tests (e.g. {lost[0]}): "
                                f"this pytest ({pytest.__version__}) and pytest-xdist do not work together. Fix: "
                                "pip install -e '.[test]' (setup.py pins a pytest that does)")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None and not hasattr(config, "workerinput"):  # the controller made it
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Shared test helpers (test modules import them: `from conftest import make_model`): tiny configs and
# models, random inputs, and `VARIANTS`, one tiny model per layer / model variant, which tests
# parametrise over (decode == forward, logical axes, ...).

import random  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from scaling_sparse.models import DecoderLM  # noqa: E402

# The tiny preset and its variants live in scaling_sparse/variants.py (the accelerator check uses them too).
from scaling_sparse.variants import LSH_ONE_CHUNK, SPARSE_ALL, VARIANTS, tiny_config  # noqa: E402,F401


def make_model(*, seed=0, **model_fields):
    """A DecoderLM of the tiny preset with `model_fields` overridden."""
    return DecoderLM(tiny_config(**model_fields).model, rngs=nnx.Rngs(seed))


def random_tokens(seed, shape, vocab=64):
    """int32 token ids from NumPy (a new shape of jax.random costs a compile, seconds on 2 cores)."""
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def random_normal(seed, shape, dtype=jnp.float32):
    """Standard-normal activations from NumPy (for the same reason as `random_tokens`)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    """(name, model) for each of VARIANTS, built once per test module."""
    return request.param, make_model(**VARIANTS[request.param])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus of 10 files (for runs through the real data pipeline)."""
    words = "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees".split()
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    for i in range(10):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) + "." for _ in range(50)]
        (root / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return root


def run_cli(capsys, *argv):
    """Runs `python -m scaling_sparse *argv` in this process (absl flag parsing, then cli.main) ->
    (exit code, stdout, stderr). With capsys=None the output is captured here."""
    import contextlib
    import io
    import sys

    from absl import flags

    from scaling_sparse import cli

    out, err = io.StringIO(), io.StringIO()
    flags.FLAGS.unparse_flags()
    sys_argv, sys.argv = sys.argv, ["scaling_sparse", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:  # the CLI's own flag parsing (a workdir's stored config, one-line flag errors)
                code = cli.main(cli._parse_flags(sys.argv))  # config_flags reads its overrides from sys.argv
            except SystemExit as e:
                code = e.code
    finally:
        sys.argv = sys_argv
        flags.FLAGS.unparse_flags()
        # config_flags defines one flag per --config.<field> override while parsing; a second
        # parse in this process would define them again.
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)
    if capsys is not None:
        captured = capsys.readouterr()
        return code, captured.out + out.getvalue(), captured.err + err.getvalue()
    return code, out.getvalue(), err.getvalue()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli(*args, devices: int = 1, process: tuple | None = None):
    """`python -m scaling_sparse *args` as a subprocess (Popen, text pipes) on `devices` virtual CPU devices;
    process=(port, index, count) makes it process `index` of a local multi-process run."""
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"))
    extra = []
    if process is not None:
        port, index, count = process
        extra = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}", f"--process_id={index}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen([sys.executable, "-m", "scaling_sparse", *args, *extra], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def watched_child(pid: int) -> int:
    """The JAX process a multi-process command's watcher (process_watch.py) started."""
    import pathlib

    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            return int(stat.parent.name)
    raise AssertionError(f"no child of {pid}")
