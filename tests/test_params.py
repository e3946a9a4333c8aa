"""The parameter report: closed-form counts of the paper's presets, computed without allocating them."""

import jax
import pytest
from flax import nnx

from scaling_sparse.config import load_config
from scaling_sparse.params import abstract_model, format_report, report_params

PRESETS = ["medium_dense", "medium_sparse_ff", "medium_sparse_qkv", "medium_sparse_ffqkv", "medium_sparse_all",
           "large_dense", "large_sparse", "stdlib_sparse"]


@pytest.fixture(scope="module")
def reports():
    return {name: report_params(name) for name in PRESETS}


def dense_layer(d, f):
    return (4 * d * d + 4 * d) + (2 * d * f + f + d) + 4 * d  # attention, FFN, two LayerNorms


def sparse_ffn(d, f, n, r):
    b = f // n
    return {"total": 2 * d * f + d + d * r + r * f + f, "per_token": d * r + r * f + f + 2 * b * d + d}


def sparse_qkv(d, s, kl=3):
    m = d // s
    return d * s + d * m + d + 2 * (kl * 3 * m * m + m) + (kl * m * m + m)


def test_medium_dense_is_the_closed_form(reports):
    r = reports["medium_dense"]
    d, f, v, layers = 1024, 4096, 32000, 24
    embedding = v * d + 1024 * d  # token + learned positions (max_len 1024)
    assert r["total_params"] == layers * dense_layer(d, f) + embedding + 2 * d + (d * v + v) == 368_928_000
    assert r["params_per_token"] == layers * dense_layer(d, f) + 2 * d + 2 * d + (d * v + v) == 335_113_472
    assert r["bytes_per_token"] == 4 * r["params_per_token"]
    assert r["per_layer"] == {"total": dense_layer(d, f), "per_token": dense_layer(d, f)}


def test_medium_sparse_all_is_the_closed_form(reports):
    r = reports["medium_sparse_all"]
    d, f, v, layers = 1024, 6144, 32000, 24
    ffn = sparse_ffn(d, f, 64, 96)
    layer_total = sparse_qkv(d, 16) + ffn["total"] + 4 * d
    layer_token = sparse_qkv(d, 16) + ffn["per_token"] + 4 * d
    output = 4 * d + d * (v // 4) + v
    assert r["per_layer"] == {"total": layer_total, "per_token": layer_token}
    assert r["total_params"] == layers * layer_total + v * d + 1024 * d + 2 * d + output
    assert r["params_per_token"] == layers * layer_token + 2 * d + 2 * d + output
    assert r["components"]["output"] == {"total": output, "per_token": output}
    # docs/semantics.md §6: about 10x fewer bytes per token than dense.
    assert 9 < reports["medium_dense"]["params_per_token"] / r["params_per_token"] < 11


def test_sparse_ff_and_qkv_keep_the_dense_parameter_count(reports):
    ratio = reports["medium_sparse_ffqkv"]["total_params"] / reports["medium_dense"]["total_params"]
    assert 1.0 < ratio < 1.06
    assert reports["medium_sparse_ffqkv"]["sizes"]["d_ff"] == 6144


def test_large_slices_per_layer(reports):
    d = 9216
    assert reports["large_dense"]["sizes"]["n_layers"] == 2
    assert reports["large_dense"]["per_layer"]["total"] == dense_layer(d, 40960)
    ffn = sparse_ffn(d, 65536, 256, 32)
    large = reports["large_sparse"]
    assert large["sizes"]["ff_lowrank"] == 32
    assert large["per_layer"] == {"total": sparse_qkv(d, 64) + ffn["total"] + 4 * d,
                                  "per_token": sparse_qkv(d, 64) + ffn["per_token"] + 4 * d}


def test_components_cover_every_parameter_exactly_once():
    for name in ("stdlib_sparse", "tiny"):
        config = load_config(name)
        if name == "tiny":
            config.model.update(ff_sparsity=8, attn_sparsity=4, attn_output="mult", loss_type="lowrank",
                                loss_lowrank=8)
        model = abstract_model(config.model)
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
        assert report_params(config)["total_params"] == sum(x.size for x in leaves)


def test_layer_count_and_dtype_are_flags():
    config = load_config("large_sparse")
    config.model.update(n_layers=4, dtype="bfloat16")
    r = report_params(config, name="large_sparse")
    base = report_params("large_sparse")
    assert r["total_params"] - base["total_params"] == 2 * base["per_layer"]["total"]
    assert r["bytes_per_token"] == 2 * r["params_per_token"]
    assert r["config"] == "large_sparse" and r["sizes"]["n_layers"] == 4


def test_format_report(reports):
    text = format_report(reports["medium_sparse_all"])
    for word in ("medium_sparse_all", "embedding", "attention", "ffn", "norms", "output", "per layer",
                 f"{reports['medium_sparse_all']['total_params']:,}"):
        assert word in text
