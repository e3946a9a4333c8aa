import os

# Tests run on the CPU, offline, on 2 cores.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Shared test helpers (test modules import them: `from conftest import make_model`): tiny configs and
# models, random inputs, and `VARIANTS`, one tiny model per layer / model variant, which tests
# parametrise over (decode == forward, logical axes, ...).

import random  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from scaling_sparse.config import load_config, validate  # noqa: E402
from scaling_sparse.model import DecoderLM  # noqa: E402

# The "tiny" preset: vocab 64, d_model 32, d_ff 64, 4 heads, 2 layers, max_len 64.
SPARSE_ALL = dict(ff_sparsity=8, attn_sparsity=4, loss_sparsity=4)
# LSH decodes with full attention over the cache (layers/lsh.py), which equals the forward pass when
# the sequence fits one LSH chunk: chunk 64 = max_len. Several chunks are covered in test_lsh.py.
LSH_ONE_CHUNK = dict(attention="lsh", lsh_chunk_len=64, lsh_n_hashes=2)

# Name -> model-field overrides of the tiny preset, one per layer / model variant.
VARIANTS = {
    "dense": {},
    "sparse_ff": dict(ff_sparsity=8),
    "sparse_qkv": dict(attn_sparsity=4, attn_output="none"),
    "sparse_qkv_out_dense": dict(attn_sparsity=4, attn_output="dense"),
    "sparse_qkv_out_mult": dict(attn_sparsity=4, attn_output="mult"),
    "loss_mult": dict(loss_sparsity=4, loss_type="mult"),
    "loss_lowrank": dict(loss_type="lowrank", loss_lowrank=8),
    "sparse_all": SPARSE_ALL,
    "sru": dict(ff_sru_units=8),
    "reversible": dict(reversible=True),
    "reversible_sparse_all": dict(reversible=True, **SPARSE_ALL),
    "lsh_one_chunk": LSH_ONE_CHUNK,
    "terraformer_one_chunk": dict(reversible=True, ff_sru_units=8, **LSH_ONE_CHUNK, **SPARSE_ALL),
    # Compressed dense models (docs/compression.md): SVD / ASVD factor pairs, and a CoFi-pruned shape
    # (narrower hidden dimension, heads of the original width, layer 0 without FFN, layer 1 without attention).
    "factorised": dict(factor_rank_attn=8, factor_rank_ff=8),
    "pruned": dict(d_model=24, d_head=8, layer_heads=(3, 0), layer_d_ff=(0, 40)),
}


def tiny_config(**model_fields):
    """The tiny preset with `model_fields` overridden, validated (raises ConfigError naming a field)."""
    c = load_config("tiny")
    c.model.update(**model_fields)
    return validate(c)


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
            code = cli.main(flags.FLAGS(sys.argv))  # config_flags reads its overrides from sys.argv
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
