"""SVD and ASVD factorisation (scaling_sparse/compress/svd.py, docs/compression.md): the factor
algebra, full rank reproducing the dense model, ASVD's folded-back scaling, and the workdir it writes."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import random_tokens, tiny_config
from scaling_sparse.checkpoint import CheckpointError, load_saved_config
from scaling_sparse.compress import svd
from scaling_sparse.compress.calibration import input_abs_means
from scaling_sparse.compress.workdir import check_dense_source
from scaling_sparse.config import ConfigError, ModelConfig, validate
from scaling_sparse.sharding import single_device_mesh
from scaling_sparse.state import init_params, model_spec


def _dense():
    config = tiny_config()
    graphdef, params = init_params(config.model, single_device_mesh(), config.mesh.rules, seed=3)
    return config, graphdef, jax.device_get(params)


def _logits(model_fields, params, tokens):
    m = ModelConfig.from_config(tiny_config(**model_fields).model)
    return nnx.merge(model_spec(m).graphdef, params)(tokens)


@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_full_rank_reproduces_the_dense_logits(method):
    config, graphdef, params = _dense()
    m = ModelConfig.from_config(config.model)
    tokens = random_tokens(0, (2, 12))
    scales = None
    if method == "asvd":
        means = input_abs_means(graphdef, params, [{"inputs": np.asarray(tokens)}])
        scales = {path: means[path] for _, path in svd.linear_paths(m)}
    full = svd.factorise_params(params, m, rank_attn=32, rank_ff=32, scales=scales)
    np.testing.assert_allclose(_logits(dict(factor_rank_attn=32, factor_rank_ff=32), full, tokens),
                               nnx.merge(graphdef, params)(tokens), atol=1e-4)


def test_asvd_scaling_is_folded_back_exactly():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 24)).astype(np.float32)
    s = np.exp(rng.standard_normal(16))
    a, b = svd.factorise(w, 16, s)
    np.testing.assert_allclose(a @ b, w, atol=1e-5)
    a_scaled, b_scaled = svd.factorise(s[:, None].astype(np.float32) * w, 16)
    np.testing.assert_allclose(a, a_scaled / s[:, None], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b, b_scaled, atol=1e-5)


def test_truncated_svd_is_the_best_rank_r_approximation():
    w = np.random.default_rng(1).standard_normal((20, 30))
    a, b = svd.factorise(w, 5)
    dropped = np.linalg.svd(w, compute_uv=False)[5:]
    assert np.linalg.norm(w - a @ b) == pytest.approx(np.sqrt(np.sum(dropped ** 2)), rel=1e-9)


def test_asvd_beats_svd_when_a_few_input_channels_dominate():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 32))
    x = rng.standard_normal((512, 32))
    x[:, :4] *= 30.0  # outlier channels, as in trained LMs' activations
    a, b = svd.factorise(w, 8)
    a2, b2 = svd.factorise(w, 8, svd.asvd_scale(np.abs(x).mean(0)))
    assert np.linalg.norm(x @ (a2 @ b2) - x @ w) < 0.7 * np.linalg.norm(x @ (a @ b) - x @ w)


def test_rank_for_keep():
    assert svd.rank_for_keep(0.5, 256, 256) == 64 and svd.rank_for_keep(0.5, 256, 1024) == 102
    assert svd.rank_for_keep(0.001, 8, 8) == 1


def test_only_dense_decoders_are_compressed():
    with pytest.raises(ConfigError, match="model.ff_sparsity"):
        check_dense_source(tiny_config(ff_sparsity=8))


def test_end_to_end_workdir_evaluates_resumes_and_keeps_the_source(tmp_path):
    from scaling_sparse.compress import run_compress
    from scaling_sparse.train import evaluate, train

    config = tiny_config()
    config.train.update(num_steps=2, checkpoint_every=2, eval_every=2, sample_at_end=False)
    src = tmp_path / "dense"
    train(config, src, echo=lambda s: None)
    before = sorted(p.name for p in src.rglob("*"))
    summary = run_compress(config, src, tmp_path / "svd", method="asvd", keep=0.5, calibration_batches=2,
                           echo=lambda s: None)
    assert summary["per_token_after"] < summary["per_token_before"] and summary["extra_steps"] == 0
    assert sorted(p.name for p in src.rglob("*")) == before  # nothing written into the source
    saved = validate(load_saved_config(tmp_path / "svd"))
    assert saved.model.factor_rank_attn == summary["rank_attn"] > 0
    assert json.loads((tmp_path / "svd" / "compression.json").read_text())["method"] == "asvd"
    assert np.isfinite(evaluate(saved, tmp_path / "svd")["eval_loss"])
    saved.train.num_steps = 4
    assert train(saved, tmp_path / "svd", echo=lambda s: None)["step"] == 4  # resumes from step 2
    with pytest.raises(CheckpointError, match="already holds files"):
        run_compress(config, src, tmp_path / "svd", method="svd", rank=2, echo=lambda s: None)
