"""Weight-only int8 (scaling_sparse/quantize.py, docs/quantization.md): the rounding, which weights are
quantised with which scales in every variant, and the int8 workdir / --weights flag end to end. Decode
equals the forward pass with int8 weights in test_decode_equals_forward.py and test_encdec.py; sharded
equals unsharded in test_sharding.py."""

import json

import jax
import numpy as np
import pytest

from conftest import run_cli, tiny_config
from scaling_sparse.config import ConfigError, ModelConfig, validate
from scaling_sparse.quantize import Int8Weight, quantize
from scaling_sparse.state import model_spec
from scaling_sparse.variants import ENCDEC_VARIANTS, VARIANTS, tiny_encdec_config

# Parameters of two or more dimensions that stay float: the sparse FFN's controller bias [B, N].
FLOAT_MATRICES = {"cb"}


def test_each_slice_is_rounded_to_within_half_a_step_of_its_own_scale():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32) * np.array([1e-3, 1.0, 10.0, 0.5, 1.0], np.float32)
    w[:, 4] = 0.0  # an all-zero output channel
    q = quantize(w, (0,))
    assert q.q.dtype == np.int8 and q.scale.shape == (1, 5) and q.scale.dtype == np.float32
    scale = np.asarray(q.scale)
    np.testing.assert_allclose(scale[0, :4], np.abs(w[:, :4]).max(0) / 127, rtol=1e-6)
    assert scale[0, 4] == 1.0 and not np.asarray(q.q)[:, 4].any()
    assert (np.abs(np.asarray(q.q)).max(0)[:4] == 127).all()  # each channel uses its full range
    assert (np.abs(np.asarray(q[...]) - w) <= scale / 2 * (1 + 1e-6)).all()
    rows = quantize(w, (1,))  # one scale per row instead
    assert rows.scale.shape == (6, 1)


def _abstract(config):
    config.model.weights = "int8"
    return model_spec(ModelConfig.from_config(config.model)).params


@pytest.mark.parametrize("name,config", [(f"decoder/{n}", tiny_config(**f)) for n, f in VARIANTS.items()]
                         + [(f"encdec/{n}", tiny_encdec_config(**f)) for n, f in ENCDEC_VARIANTS.items()])
def test_every_matrix_of_every_variant_is_int8_and_vectors_stay_float(name, config):
    flat = jax.tree_util.tree_flatten_with_path(_abstract(config), is_leaf=lambda x: isinstance(x, Int8Weight))[0]
    int8 = 0
    for path, leaf in flat:
        key = path[-1].key
        if isinstance(leaf, Int8Weight):
            int8 += 1
            assert leaf.q.dtype == np.int8 and leaf.scale.dtype == np.float32, (name, path)
            assert leaf.ndim >= 2 and key not in FLOAT_MATRICES, (name, path)
            # One scale per row or output channel: a single dimension of the weight's survives.
            kept = [s for s in leaf.scale.shape if s != 1]
            assert len(kept) <= 2 and leaf.scale.size < leaf.size, (name, path, leaf.scale.shape)
        else:
            assert leaf.dtype == np.float32 and (leaf.ndim == 1 or key in FLOAT_MATRICES), (name, path, leaf.shape)
    assert int8 >= 5


def test_the_layouts_named_in_the_issue():
    """Sparse FFN stores per unit row, dense matrices and convolutions per output channel, embeddings per row."""
    p = _abstract(tiny_config(ff_sparsity=8, attn_sparsity=4, loss_sparsity=4))
    ffn = p["stack"]["blocks"][0]["ffn"]
    assert ffn["w1"].scale.shape == (8, 8, 1) and ffn["w2"].scale.shape == (8, 8, 1)
    assert ffn["c1"].scale.shape == (1, 8) and ffn["c2"].scale.shape == (1, 8, 8)
    assert p["stack"]["blocks"][0]["attn"]["qkv"]["conv_q"]["kernel"].scale.shape == (1, 1, 1, 8)
    assert p["token_embed"].scale.shape == (64, 1)
    assert p["output"]["kernel"].scale.shape == (16, 1)  # the multiplicative output's unit-major [vocab/S, d]
    dense = _abstract(tiny_config())
    assert dense["stack"]["blocks"][0]["ffn"]["w_in"]["kernel"].scale.shape == (1, 64)
    assert dense["output"]["kernel"].scale.shape == (1, 64)


def test_int8_workdir_and_weights_flag_end_to_end(tmp_path, corpus, capsys):
    src, out = tmp_path / "src", tmp_path / "int8"
    common = ["--config=experiments/configs/tiny.py", "--config.data.source=files", f"--config.data.path={corpus}"]
    code, _, err = run_cli(capsys, "train", f"--workdir={src}", *common, "--config.train.num_steps=4",
                           "--config.train.progress=False", "--config.train.sample_at_end=False")
    assert code == 0, err

    def eval_loss(workdir, *flags):
        code, text, err = run_cli(capsys, "eval", f"--workdir={workdir}", "--json", *flags)
        assert code == 0, err
        return json.loads(text.strip().splitlines()[-1])["eval_loss"]

    # A workdir written before model.weights existed (its config.json lacks the field) reads as float.
    stored = json.loads((src / "config.json").read_text())
    del stored["model"]["weights"]
    (src / "config.json").write_text(json.dumps(stored))
    code, text, err = run_cli(capsys, "compress", f"--workdir={src}", "--method=int8", f"--out={out}")
    assert code == 0, err
    provenance = json.loads((out / "compression.json").read_text())
    assert provenance["method"] == "int8" and provenance["bytes_after"] < provenance["bytes_before"] / 3
    assert json.loads((out / "config.json").read_text())["model"]["weights"] == "int8"
    float_loss, int8_loss = eval_loss(src), eval_loss(out)
    assert int8_loss == eval_loss(src, "--weights=int8")  # quantised at load = the int8 checkpoint
    # Dequantised: the same weights, the scale applied before the sums instead of after them.
    assert eval_loss(out, "--weights=float") == pytest.approx(int8_loss, rel=1e-6)
    assert abs(int8_loss - float_loss) < 0.01 * float_loss and int8_loss != float_loss
    code, text, err = run_cli(capsys, "generate", f"--workdir={out}", "--prompt=the cat", "--temperature=0",
                              "--max_new_tokens=4")
    assert code == 0 and text.startswith("the cat") and "int8" in err, err
    code, _, err = run_cli(capsys, "train", f"--workdir={out}")
    assert code != 0 and "int8 weights are for evaluation and decoding" in err
    code, _, err = run_cli(capsys, "compress", f"--workdir={out}", "--method=int8", f"--out={tmp_path / 'again'}")
    assert code != 0 and "already holds int8 weights" in err


def test_an_unknown_weights_value_names_the_field():
    config = tiny_config()
    config.model.weights = "int4"
    with pytest.raises(ConfigError, match="model.weights"):
        validate(config)
