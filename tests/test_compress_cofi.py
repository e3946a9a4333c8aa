"""CoFi structured pruning (scaling_sparse/compress/cofi.py, docs/compression.md): the masked forward
pass, the hard-concrete masks, pruning that equals masking, the Lagrangian, and the workdir it writes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_tokens, tiny_config
from scaling_sparse.checkpoint import load_saved_config
from scaling_sparse.compress import cofi
from scaling_sparse.compress import hard_concrete as hc
from scaling_sparse.compress import masked_forward as mf
from scaling_sparse.config import ModelConfig, validate
from scaling_sparse.decode import Decoder
from scaling_sparse.sharding import single_device_mesh
from scaling_sparse.state import init_params, model_spec

TOKENS = random_tokens(0, (2, 12))


def _dense(seed=3):
    config = tiny_config()
    graphdef, params = init_params(config.model, single_device_mesh(), config.mesh.rules, seed=seed)
    return config, ModelConfig.from_config(config.model), graphdef, jax.device_get(params)


def test_all_ones_masks_leave_the_model_unchanged():
    _, m, graphdef, params = _dense()
    logits, hidden = mf.forward(params, TOKENS, mf.full_masks(m), m)
    np.testing.assert_allclose(logits, nnx.merge(graphdef, params)(TOKENS), atol=1e-6)
    assert hidden.shape == (m.n_layers, 2, 12, m.d_model)


def test_hard_concrete_samples_and_probabilities():
    log_alpha = jnp.full((20000,), 0.3)
    z = np.asarray(hc.sample(log_alpha, jax.random.PRNGKey(0)))
    assert z.min() == 0.0 and z.max() == 1.0 and ((z > 0) & (z < 1)).any()
    assert (z != 0).mean() == pytest.approx(float(hc.prob_nonzero(log_alpha)[0]), abs=0.01)
    det = hc.deterministic(np.linspace(-3, 3, 10))
    expected_zeros = 10 - round(float(hc.prob_nonzero(jnp.linspace(-3, 3, 10)).sum()))
    assert (det == 0).sum() == expected_zeros and (det[:expected_zeros] == 0).all()


def _some_masks(m):
    rng = np.random.default_rng(4)
    z = {k: rng.uniform(0.3, 1.0, s).astype(np.float32) for k, s in cofi.mask_shapes(m).items()}
    z["head"][0, [1, 3]] = 0.0       # two heads of layer 0
    z["attn"][1] = 0.0               # layer 1's whole attention
    z["int"][0, :20] = 0.0           # FFN units of layer 0
    z["ffn"][1] = 0.0                # layer 1's whole FFN
    z["hidden"][[2, 5, 30]] = 0.0    # three hidden dimensions
    return z


def test_pruned_model_equals_the_masked_model():
    _, m, _, params = _dense()
    z = _some_masks(m)
    pruned, shape = cofi.prune(params, z, m)
    assert shape == {"d_model": 29, "d_head": 8, "layer_heads": (2, 0), "layer_d_ff": (44, 0)}
    new = ModelConfig.from_config(tiny_config(**shape).model)
    model = nnx.merge(model_spec(new).graphdef, jax.tree.map(jnp.asarray, pruned))
    want, _ = mf.forward(params, TOKENS, {k: jnp.asarray(v) for k, v in z.items()}, m)
    np.testing.assert_allclose(model(TOKENS), want, atol=1e-4)
    assert cofi.size_of_masks(z, m) == 29 * (2 * 4 * 8 + 44 * 2)


def test_the_lagrangian_drives_expected_sparsity_to_the_target():
    _, m, _, params = _dense()
    tx = cofi.make_optimizer()
    trainable = cofi.init_trainable(jax.tree.map(jnp.asarray, params), m)
    opt_state = tx.init(trainable)
    teacher = jax.tree.map(jnp.asarray, params)
    step = cofi.make_step(m, tx)
    batch = {"inputs": TOKENS, "weights": jnp.ones(TOKENS.shape)}
    start = float(cofi.expected_sparsity(trainable["log_alpha"], m))
    for i in range(60):
        trainable, opt_state, metrics = step(trainable, opt_state, teacher, batch, jax.random.PRNGKey(i),
                                             jnp.float32(0.5))
    assert start < 0.1 and float(metrics["expected_sparsity"]) > 0.3
    assert float(trainable["lambdas"][0]) != 0.0


def test_end_to_end_pruned_workdir(tmp_path):
    from scaling_sparse.compress import run_compress
    from scaling_sparse.train import evaluate, load_params, train

    config = tiny_config()
    config.train.update(num_steps=2, checkpoint_every=2, eval_every=2, sample_at_end=False)
    src = tmp_path / "dense"
    train(config, src, echo=lambda s: None)
    summary = run_compress(config, src, tmp_path / "cofi", method="cofi", target_sparsity=0.5, steps=3,
                           echo=lambda s: None)
    assert summary["extra_steps"] == 3 and summary["per_token_after"] <= summary["per_token_before"]
    saved = validate(load_saved_config(tmp_path / "cofi"))
    assert len(saved.model.layer_heads) == 2
    assert np.isfinite(evaluate(saved, tmp_path / "cofi")["eval_loss"])
    saved.train.num_steps = 7
    assert train(saved, tmp_path / "cofi", echo=lambda s: None)["step"] == 7  # resumes from step 2 + 3
    # The pruned model decodes: greedy tokens of the Decoder equal the full pass's argmax.
    m = ModelConfig.from_config(saved.model)
    graphdef, params, _ = load_params(saved, tmp_path / "cofi", mesh=single_device_mesh())
    decoder = Decoder(graphdef, params, max_len=m.max_len)
    out = np.asarray(decoder.generate(TOKENS[:1, :5], 1))
    full = nnx.merge(graphdef, params)(TOKENS[:1, :5])
    assert out[0, 0] == int(jnp.argmax(full[0, -1]))


def test_a_layer_without_heads_or_units_loses_its_sub_layer_gate():
    _, m, _, _ = _dense()
    log_alpha = {k: np.full(s, 3.0, np.float32) for k, s in cofi.mask_shapes(m).items()}
    log_alpha["head"][1] = -10.0  # every head of layer 1 expected off
    log_alpha["int"][0] = -10.0   # every unit of layer 0 expected off
    z = cofi.deterministic_masks(log_alpha)
    assert (z["head"][1] == 0).all() and z["attn"][1] == 0 and z["attn"][0] != 0
    assert (z["int"][0] == 0).all() and z["ffn"][0] == 0 and z["ffn"][1] != 0
