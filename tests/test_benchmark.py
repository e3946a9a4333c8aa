"""The benchmark harness: its arithmetic (benchmarks/reporting.py), the model set-up
(benchmarks/models.py), and end-to-end runs of the scripts on the tiny preset."""

import json

import pytest

from benchmarks import decode_latency as bench
from benchmarks import models, reporting
from scaling_sparse.config import load_config


def test_bytes_per_token_from_parameter_counts():
    assert reporting.bytes_per_token(1000, "float32") == 4000
    assert reporting.bytes_per_token(1000, "bfloat16") == 2000


def test_tiny_parameter_count_per_token_by_hand():
    # tiny: vocab 64, d 32, f 64, 2 layers, dense everywhere.
    d, f, v, layers = 32, 64, 64, 2
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d  # qkv, out, ffn, 2 LN
    expected = 2 * d + layers * per_layer + 2 * d + (d * v + v)  # embedding rows, blocks, final LN, output
    counts = models.param_report(load_config("tiny"))
    assert counts["params_per_token"] == expected
    assert reporting.bytes_per_token(counts["params_per_token"], "float32") == 4 * expected


def test_bandwidth_fraction_and_speedup():
    # 1 GB read per token in 100 ms is 10 GB/s: half of a 20 GB/s memory.
    assert reporting.implied_gb_per_s(1e9, 100.0) == pytest.approx(10.0)
    assert reporting.bandwidth_fraction(1e9, 100.0, 20.0) == pytest.approx(0.5)
    assert reporting.speedup(160.0, 40.0) == pytest.approx(4.0)


def test_size_groups():
    assert models.size_group("medium_sparse_ff") == "medium"
    assert models.size_group("large_dense") == "large"
    assert models.size_group("terraformer_medium") == "medium"
    assert models.size_group("experiments/configs/tiny.py") == "tiny"


def _row(preset, dense, ms, nbytes, n_layers=24, per_call=None):
    return {"preset": preset, "size_group": models.size_group(preset), "dense": dense, "n_layers": n_layers,
            "ms_per_token": ms, "per_call_ms_per_token": per_call or ms, "bytes_per_token": nbytes}


def test_speedups_compare_dense_of_the_same_size_and_depth():
    rows = reporting.add_speedups([
        _row("medium_dense", True, 100.0, 1000),
        _row("medium_sparse_all", False, 20.0, 100, per_call=25.0),
        _row("large_dense", True, 900.0, 9000, n_layers=2),
        _row("large_sparse", False, 90.0, 300, n_layers=2),
        _row("large_sparse_deeper", False, 90.0, 300, n_layers=4),  # no dense slice of 4 layers
    ])
    by = {r["preset"]: r for r in rows}
    assert by["medium_dense"]["speedup_vs_dense"] == pytest.approx(1.0)
    assert by["medium_sparse_all"]["speedup_vs_dense"] == pytest.approx(5.0)
    assert by["medium_sparse_all"]["per_call_speedup_vs_dense"] == pytest.approx(4.0)
    assert by["medium_sparse_all"]["byte_ratio_vs_dense"] == pytest.approx(10.0)
    assert by["large_sparse"]["speedup_vs_dense"] == pytest.approx(10.0)
    assert by["large_sparse"]["dense_baseline"] == "large_dense"
    assert by["large_sparse_deeper"]["speedup_vs_dense"] is None


def test_large_layer_plan():
    config = load_config("tiny")  # stands in for a 17B preset: the plan only needs counts
    n, note = models.large_layers_plan(config, None, backend="cpu", capacity_bytes=1 << 40, dtype="float32")
    assert n == 2 and "slice" in note
    n, _ = models.large_layers_plan(config, 1, backend="gpu", capacity_bytes=1 << 40, dtype="bfloat16")
    assert n == 1
    n, _ = models.large_layers_plan(config, 99, backend="cpu", capacity_bytes=1 << 40, dtype="float32", full=15)
    assert n == 15
    n, note = models.large_layers_plan(config, None, backend="gpu", capacity_bytes=1 << 40, dtype="bfloat16")
    assert n == models.LARGE_FULL_LAYERS and "all" in note
    # Room for the embeddings and output layer plus one block only.
    one = models.param_report(models.with_overrides(config, dtype="bfloat16", n_layers=1))["total_params"]
    n, note = models.large_layers_plan(config, None, backend="gpu", capacity_bytes=int(2 * one * 1.1 / 0.85),
                                      dtype="bfloat16")
    assert n == 1 and "do not fit" in note


def test_unknown_preset_fails_before_timing():
    with pytest.raises(SystemExit, match="no_such_preset"):
        bench.main(["--presets=no_such_preset", "--no_plot"])


def test_bad_flag_values_are_rejected():
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens=0"])


def test_end_to_end_tiny_writes_json_and_plot(tmp_path):
    report = bench.main(["--presets=tiny", "--quick", "--tokens=4", "--repeats=2", "--per_call_tokens=3",
                         "--prompt_len=4", "--bandwidth_mb=16", f"--out_dir={tmp_path}"])
    data = json.loads((tmp_path / "decode_cpu.json").read_text())
    assert (tmp_path / "decode_cpu.png").stat().st_size > 0
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["devices"]
    assert data["machine"]["versions"]["jax"]
    assert data["bandwidth"]["gb_per_s"] > 0
    (r,) = data["results"]
    for key in ("preset", "ms_per_token", "speedup_vs_dense", "bytes_per_token", "bandwidth_fraction",
                "ms_per_token_min", "ms_per_token_max", "prefill_ms", "tokens_per_s", "per_call_ms_per_token",
                "params_per_token", "n_layers", "dtype", "size_group"):
        assert key in r, key
    assert r["preset"] == "tiny" and r["dtype"] == "float32" and r["n_layers"] == 2
    assert r["ms_per_token"] > 0 and r["per_call_ms_per_token"] > 0
    assert r["speedup_vs_dense"] == pytest.approx(1.0)
    assert r["bandwidth_fraction"] == pytest.approx(
        reporting.bandwidth_fraction(r["bytes_per_token"], r["ms_per_token"], data["bandwidth"]["gb_per_s"]))
    assert r["per_call_matches_loop"]  # greedy: both decoding modes produce the same tokens
    assert report["results"][0]["preset"] == "tiny"


def test_benchmark_weights_are_the_state_builders_in_the_target_dtype():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from scaling_sparse import sharding, state

    config = models.with_overrides(load_config("tiny"), dtype="bfloat16")
    graphdef, params = models.build(config, seed=3)
    # The same weights as the state builder's init of that config on one device, cast to the dtype.
    ref_graphdef, ref = state.init_params(config.model, sharding.single_device_mesh(),
                                          sharding.logical_rules(config.mesh), seed=3, dtype="bfloat16")
    assert graphdef == ref_graphdef
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # Every weight is stored in the decode dtype, on one device.
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert all(len(leaf.sharding.device_set) == 1 for leaf in jax.tree.leaves(params))
    decoder, init_s = models.build_decoder(config, seed=3)
    assert init_s >= 0 and decoder.max_len == config.model.max_len
    out = decoder.generate([[1, 2, 3]], 2)
    assert out.shape == (1, 2)


def test_profile_decode_ranks_the_ops_of_the_decode_loop(tmp_path):
    from benchmarks import profile_decode

    result = profile_decode.main(["--preset=tiny", "--tokens=4", "--prompt_len=4", "--top=5",
                                  f"--out={tmp_path / 'profile.json'}"])
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["preset"] == "tiny" and saved["ops"]
    shares = [row["share"] for row in result["ops"]]
    assert sum(shares) == pytest.approx(1.0) and shares == sorted(shares, reverse=True)
    assert any("dot" in row["op"] for row in result["ops"])  # the matmuls show up by name


def test_train_memory_quick_sweep(tmp_path):
    from benchmarks import train_memory

    result = train_memory.main(["--quick", f"--out={tmp_path / 'train_memory'}"])
    saved = json.loads((tmp_path / "train_memory.json").read_text())
    assert (tmp_path / "train_memory.png").stat().st_size > 0
    rows = saved["depth"]["rows"]
    assert {(r["reversible"], r["n_layers"]) for r in rows} == {(False, 2), (False, 4), (True, 2), (True, 4)}
    assert all(r["total"] == r["temp"] + r["argument"] + r["output"] > 0 for r in rows)
    # Standard stacks store every layer's activations; the reversible stack's step grows far less.
    growth = result["depth"]["growth_12_to_48"]
    assert growth["standard"] > growth["reversible"]
    entry = saved["lengths"][0]
    assert entry["full"]["longest"] >= 256 and entry["lsh"]["longest"] >= entry["full"]["longest"]
