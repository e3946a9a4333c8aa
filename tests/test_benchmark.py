"""The benchmark harness: its arithmetic (benchmarks/reporting.py), the model set-up
(benchmarks/models.py), and end-to-end runs of the scripts on the tiny preset."""

import json

import pytest

from benchmarks import decode_latency as bench
from benchmarks import models, paper_rows, reporting
from scaling_sparse.config import load_config
from scaling_sparse.kernels import cpu as cpu_kernels


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
    with pytest.raises(SystemExit):  # the paper rows have no pure-JAX twins
        bench.parse_args(["--paper_rows", "--cpu_kernels=compare"])


def test_end_to_end_tiny_writes_json_and_plot(tmp_path):
    report = bench.main(["--presets=tiny", "--quick", "--tokens=4", "--repeats=2", "--per_call_tokens=3",
                         "--prompt_len=4", "--bandwidth_mb=16", f"--out_dir={tmp_path}", "--weights=float"])
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
    # Decoding only reads weights: the read bandwidth gives the floor it is compared with.
    read = data["bandwidth"]["read_gb_per_s"]
    assert r["read_floor_ms_per_token"] == pytest.approx(r["bytes_per_token"] / (read * 1e9) * 1e3)
    assert r["read_bandwidth_fraction"] == pytest.approx(r["read_floor_ms_per_token"] / r["ms_per_token"])
    assert "xla_flags" in data["settings"]
    assert r["per_call_matches_loop"]  # greedy: both decoding modes produce the same tokens
    assert report["results"][0]["preset"] == "tiny"
    # A dense model has no sparse layer, but decodes its attention with the attention kernel where built:
    # the dense baseline gets the same care as the sparse models.
    if cpu_kernels.available():
        assert r["decode_path"] == "cpu_kernels" and r["cpu_kernel_targets"] == [cpu_kernels.ATTENTION_TARGET]
    else:
        assert r["decode_path"] == "jax" and r["cpu_kernel_targets"] == []
    assert data["settings"]["cpu_kernels"] == "auto"
    assert data["settings"]["cpu_kernels_status"]["available"] == cpu_kernels.available()


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU decode kernels are not built")
def test_cpu_kernels_compare_times_the_pure_jax_path_beside_the_kernels(tmp_path):
    bench.main(["--presets=tiny_terraformer", "--cpu_kernels=compare", "--quick", "--tokens=4", "--repeats=2",
                "--per_call_tokens=3", "--prompt_len=4", "--bandwidth_mb=16", "--no_plot", f"--out_dir={tmp_path}",
                "--weights=float"])
    kernel, jax_path = json.loads((tmp_path / "decode_cpu.json").read_text())["results"]
    assert kernel["decode_path"] == "cpu_kernels" and kernel["preset"] == "tiny_terraformer"
    assert set(kernel["cpu_kernel_targets"]) == {cpu_kernels.FFN_TARGET, cpu_kernels.QKV_TARGET,
                                                 cpu_kernels.ATTENTION_TARGET}
    assert jax_path["decode_path"] == "jax" and jax_path["cpu_kernel_targets"] == []
    assert jax_path["label"] == "tiny_terraformer@jax" and jax_path["bytes_per_token"] == kernel["bytes_per_token"]
    assert kernel["speedup_vs_jax_path"] == pytest.approx(jax_path["ms_per_token"] / kernel["ms_per_token"])


def test_cpu_kernels_off_decodes_on_the_pure_jax_path(tmp_path):
    bench.main(["--presets=tiny_terraformer", "--cpu_kernels=off", "--quick", "--tokens=2", "--repeats=1",
                "--per_call_tokens=2", "--prompt_len=4", "--bandwidth_mb=16", "--no_plot", f"--out_dir={tmp_path}"])
    rows = json.loads((tmp_path / "decode_cpu.json").read_text())["results"]
    assert [r.get("weights") for r in rows] == ["float", "int8"]  # --weights=both, the float32 default
    assert all(r["decode_path"] == "jax" and r["cpu_kernel_targets"] == [] for r in rows)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU decode kernels are not built")
def test_each_preset_is_also_decoded_with_int8_weights(tmp_path):
    bench.main(["--presets=tiny,tiny_terraformer", "--quick", "--tokens=2", "--repeats=1", "--per_call_tokens=2",
                "--prompt_len=4", "--bandwidth_mb=16", "--no_plot", f"--out_dir={tmp_path}"])
    rows = {r.get("label", r["preset"]): r for r in json.loads((tmp_path / "decode_cpu.json").read_text())["results"]}
    assert set(rows) == {"tiny", "tiny@int8", "tiny_terraformer", "tiny_terraformer@int8"}
    for name in ("tiny", "tiny_terraformer"):
        float_row, int8_row = rows[name], rows[f"{name}@int8"]
        assert int8_row["weights"] == "int8" and int8_row["bytes_per_token"] < 0.3 * float_row["bytes_per_token"]
        assert int8_row["speedup_vs_float"] == pytest.approx(float_row["ms_per_token"] / int8_row["ms_per_token"])
        assert not {cpu_kernels.FFN_TARGET, cpu_kernels.QKV_TARGET} & set(int8_row["cpu_kernel_targets"])
    assert {cpu_kernels.FFN_INT8_TARGET, cpu_kernels.QKV_INT8_TARGET} <= set(rows["tiny_terraformer@int8"]["cpu_kernel_targets"])
    # An int8 row's dense baseline is the int8 dense row (the dense model gets the same int8 care).
    assert rows["tiny@int8"]["dense_baseline"] == "tiny" and rows["tiny@int8"]["speedup_vs_dense"] == pytest.approx(1.0)


def test_17b_harness_runs_each_model_in_its_own_process(tmp_path):
    """benchmarks/decode_17b.py --quick: tiny stand-ins for the 17B models, int8 weights drawn directly."""
    from benchmarks import decode_17b

    result = decode_17b.main(["--quick", f"--out={tmp_path / 'd17.json'}", "--no_plot"])
    assert [r["model"] for r in result["results"]] == ["dense", "sparse", "terraformer"]
    for r in result["results"]:
        assert r["ms_per_token"] > 0 and r["peak_rss_bytes"] > 0 and r["read_bandwidth_fraction"] > 0
        assert r["weight_bytes"] < 0.35 * 4 * r["total_params"]  # int8: a byte a weight and a scale per row
    assert result["results"][0]["distinct_units"] is None
    for r in result["results"][1:]:
        units = r["distinct_units"]
        assert units["units_per_block"] == 8 and 1 <= units["distinct_min"] <= units["distinct_max"] <= 8
    assert result["summary"]["dense"]["speedup_vs_dense"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "d17.json").read_text())["paper"]["terraformer_speedup"] == 37.0


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


def test_large_models_draw_their_weights_with_rbg(monkeypatch):
    import jax
    import numpy as np

    config = models.with_overrides(load_config("tiny"), dtype="float32")
    assert models.init_mode(config) == "threefry"
    graphdef, params = models.build(config, seed=3)
    monkeypatch.setattr(models, "RBG_INIT_BYTES", 0)  # as if tiny were over the limit
    assert models.init_mode(config) == "rbg"
    rbg_graphdef, rbg = models.build(config, seed=3)
    assert jax.config.jax_default_prng_impl == "threefry2x32"  # restored
    assert rbg_graphdef == graphdef and jax.tree.structure(rbg) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(rbg)):
        assert a.shape == b.shape and a.dtype == b.dtype
    # The same initialisers with other random bits: the random weights differ, the constant ones do not.
    flat, flat_rbg = jax.tree.leaves(params), jax.tree.leaves(rbg)
    assert any(not np.array_equal(a, b) for a, b in zip(flat, flat_rbg))
    token = np.asarray(params["token_embed"])
    assert abs(float(np.std(np.asarray(rbg["token_embed"]))) / float(np.std(token)) - 1) < 0.2
    decoder, _ = models.build_decoder(config, seed=3)
    assert decoder.generate([[1, 2, 3]], 2).shape == (1, 2)


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


# --------------------------------------------------------------------------------------------
# Training throughput (train_throughput.py, profile_train.py)

TINY_SPARSE = "tiny[ff_sparsity=8,attn_sparsity=4,loss_sparsity=4]"


def test_train_flops_per_token_by_hand_tiny_dense_and_sparse():
    from benchmarks import train_throughput as tt

    # tiny: vocab 64, d 32, f 64, 2 layers, 4 heads; sequences of 32 tokens.
    d, f, v, layers, t = 32, 64, 64, 2, 32
    dense = tt.forward_flops_per_token(load_config("tiny").model, t)
    assert dense["attention_projections"] == layers * (2 * d * 3 * d + 2 * d * d)  # fused QKV + output
    assert dense["attention_scores"] == layers * (2 * t * d + 2 * t * d)         # QK^T and probs V
    assert dense["ffn"] == layers * (2 * d * f + 2 * f * d)
    assert dense["output"] == 2 * d * v
    assert dense["total"] == 2 * (8192 + 4096 + 8192) + 4096 == 45056
    assert tt.train_flops_per_token(load_config("tiny").model, t) == 3 * 45056

    # The sparse variant: N 8 (B 8 blocks, controller rank r = f / N = 8), S 4 (M 8, kl 3), loss S 4.
    config = tt.apply_overrides(load_config("tiny"), tt.parse_spec(TINY_SPARSE)[1])
    sparse = tt.forward_flops_per_token(config.model, t)
    big_m, kl, r = 8, 3, 8
    mult = 2 * d * d                                   # gated [S, d] x [d, M]: S M d multiply-adds
    convs = 2 * kl * 3 * big_m * d * 2 + 2 * kl * 1 * big_m * d  # Q, K (3 modules), V (1); no output layer
    assert sparse["attention_projections"] == layers * (mult + convs) == 2 * (2048 + 10752)
    assert sparse["attention_scores"] == dense["attention_scores"]
    assert sparse["ffn"] == layers * (2 * d * r + 2 * r * f + 4 * d * f) == 2 * (512 + 1024 + 8192)
    assert sparse["output"] == 2 * d * v               # the multiplicative output: d V multiply-adds
    assert sparse["total"] == 57344
    assert tt.train_flops_per_token(config.model, t) == 3 * 57344


def test_reversible_training_flops_count_the_recomputation():
    from benchmarks import train_throughput as tt

    m = load_config("tiny_terraformer").model
    fwd = tt.forward_flops_per_token(m, 32)
    assert tt.train_flops_per_token(m, 32) == pytest.approx(3 * fwd["total"] + fwd["total"] - fwd["output"])


def test_preset_specs_with_overrides():
    from benchmarks import train_throughput as tt
    from scaling_sparse.config import ConfigError

    assert tt.split_specs(f"tiny, {TINY_SPARSE},stdlib") == ["tiny", TINY_SPARSE, "stdlib"]
    assert tt.parse_spec("tiny[ff_sparsity=8,train.batch_size=2,reversible=true,attention=lsh]") == (
        "tiny", {"model.ff_sparsity": 8, "train.batch_size": 2, "model.reversible": True, "model.attention": "lsh"})
    assert tt.parse_spec("medium_dense") == ("medium_dense", {})
    with pytest.raises(ConfigError, match="no_such_field"):
        tt.apply_overrides(load_config("tiny"), {"model.no_such_field": 1}, "tiny[no_such_field=1]")
    args = tt.parse_args([])
    config, base, overrides = tt.bench_config("tiny[train.batch_size=2]", args)
    assert (base, config.train.batch_size, config.train.seq_len) == ("tiny", 2, 32)
    # Medium presets get the CPU-sized batch unless told otherwise.
    config, _, _ = tt.bench_config("medium_dense", tt.parse_args(["--medium_seq=64"]), "cpu")
    assert (config.train.batch_size, config.train.seq_len, config.model.dtype) == (1, 64, "float32")
    with pytest.raises(SystemExit, match="no_such_preset"):
        tt.main(["--presets=tiny,no_such_preset", "--no_plot"])


def test_train_throughput_end_to_end_tiny(tmp_path):
    from benchmarks import train_throughput as tt

    report = tt.main([f"--presets=tiny,{TINY_SPARSE}", "--repeats=2", "--peak_n=128", "--peak_repeats=2",
                      f"--out_dir={tmp_path}"])
    data = json.loads((tmp_path / "train_throughput_cpu.json").read_text())
    assert (tmp_path / "train_throughput_cpu.png").stat().st_size > 0
    assert data["machine"]["versions"]["jax"] and data["matmul_peak"]["flops_per_s"] > 0
    assert data["schedule"] == "interleaved" and data["settings"]["presets"] == ["tiny", TINY_SPARSE]
    dense, sparse = data["results"]
    for r in (dense, sparse):
        for key in ("step_ms", "step_ms_min", "step_ms_max", "tokens_per_s", "train_flops_per_token",
                    "xla_flops_per_step", "model_flops_per_s", "model_flops_fraction_of_peak",
                    "xla_flops_fraction_of_peak", "memory", "step_time_vs_dense", "train_flops_vs_dense",
                    "xla_flops_vs_dense", "memory_vs_dense", "forward_flops_per_token", "final_loss"):
            assert r[key] is not None, key
        assert len(r["step_ms_repeats"]) == 2 and r["step_ms"] > 0 and r["loss_finite"]
        assert (r["batch_size"], r["seq_len"], r["tokens_per_step"]) == (4, 32, 128)
        assert r["tokens_per_s"] == pytest.approx(128 / (r["step_ms"] / 1e3))
        mem = r["memory"]
        assert mem["total"] == mem["temp"] + mem["argument"] + mem["output"] > 0
        # XLA counts the whole step (also elementwise ops and the optimizer): at least the matmuls.
        assert 0.9 < r["xla_over_analytic"] < 3
        assert r["model_flops_fraction_of_peak"] == pytest.approx(
            r["train_flops_per_step"] / (r["step_ms"] / 1e3) / data["matmul_peak"]["flops_per_s"])
    assert dense["dense"] and not sparse["dense"]
    assert dense["dense_baseline"] == sparse["dense_baseline"] == "tiny"
    assert dense["step_time_vs_dense"] == pytest.approx(1.0)
    assert dense["train_flops_per_token"] == 3 * 45056 and sparse["train_flops_per_token"] == 3 * 57344
    assert sparse["train_flops_vs_dense"] == pytest.approx(57344 / 45056)
    assert sparse["step_time_vs_dense"] == pytest.approx(sparse["step_ms"] / dense["step_ms"])
    assert report["results"][1]["preset"] == TINY_SPARSE


def test_profile_train_ranks_the_ops_of_the_train_step(tmp_path):
    from benchmarks import profile_train

    result = profile_train.main([f"--preset={TINY_SPARSE}", "--steps=1", "--top=5",
                                 f"--out={tmp_path / 'train_profile.json'}"])
    saved = json.loads((tmp_path / "train_profile.json").read_text())
    assert saved["preset"] == TINY_SPARSE and saved["ops"] and saved["untraced_ms_per_step"] > 0
    shares = [row["share"] for row in result["ops"]]
    assert sum(shares) == pytest.approx(1.0) and shares == sorted(shares, reverse=True)
    assert sum(p["share"] for p in result["by_pass"]) == pytest.approx(1.0)
    passes = {row["pass"] for row in result["ops"]}
    assert {"forward", "backward"} <= passes
    assert any("dot_general" in row["op"] for row in result["ops"] if row["pass"] == "backward")


# --------------------------------------------------------------------------------------------
# The paper rows (decode_latency.py --paper_rows): encoder-decoders, speedups within each group

TINY_ENCDEC = (("model.arch", "encdec"), ("model.n_encoder_layers", 1), ("data.objective", "span_corruption"))
TINY_SPARSE_ENCDEC = TINY_ENCDEC + (("model.ff_sparsity", 8), ("model.attn_sparsity", 4))
TINY_TERRAFORMER_ENCDEC = TINY_SPARSE_ENCDEC + (("model.reversible", True), ("model.ff_sru_units", 8))


def test_paper_presets_follow_the_reference_timing_test():
    # trax decoding_timing_test.py, template big_transformer and its "Sparse FF+QKV" sweep entry.
    dense, sparse = load_config("paper_large_dense_slice").model, load_config("paper_large_sparse_slice").model
    for m in (dense, sparse):
        assert (m.arch, m.n_encoder_layers, m.n_layers, m.d_model, m.n_heads, m.vocab_size) == (
            "encdec", 1, 2, 9216, 96, 32000)
        assert m.loss_sparsity == 0 and not m.reversible
    assert (dense.d_ff, dense.ff_sparsity, dense.attn_sparsity) == (40960, 0, 0)
    assert (sparse.d_ff, sparse.ff_sparsity, sparse.ff_lowrank, sparse.attn_sparsity, sparse.attn_length_kernel) == (
        65536, 256, 32, 64, 3)
    rows = {row.label: row for group in paper_rows.PAPER_GROUPS.values() for row in group.rows}
    assert rows["paper_medium_sparse_ffqkv[loss_sparsity=0]"].paper_s == 0.061
    assert paper_rows.paper_config(rows["paper_medium_sparse_ffqkv[loss_sparsity=0]"], "float32").model.loss_sparsity == 0
    assert not paper_rows.PAPER_GROUPS["large"].interleave


def test_paper_group_plan_falls_back_to_bfloat16_then_skips():
    row = paper_rows.PaperRow("tiny", "tiny", 1.0)
    group = paper_rows.PaperGroup("g", "g", (row,), interleave=False)
    size = models.param_report(load_config("tiny"))["total_params"] * 4
    plan = paper_rows.plan_group(group, "float32", paper_rows.HEADROOM_BYTES + 2 * size, dtype_forced=False)
    assert (plan["schedule"], plan["dtype"]) == ("sequential", "float32")
    plan = paper_rows.plan_group(group, "float32", paper_rows.HEADROOM_BYTES + size * 3 // 4, dtype_forced=False)
    assert (plan["schedule"], plan["dtype"]) == ("sequential", "bfloat16") and "does not fit" in plan["dtype_note"]
    plan = paper_rows.plan_group(group, "float32", paper_rows.HEADROOM_BYTES + size // 4, dtype_forced=False)
    assert plan["schedule"] == "skipped"
    plan = paper_rows.plan_group(paper_rows.PaperGroup("g", "g", (row, row)), "float32", 1 << 40, dtype_forced=False)
    assert plan["schedule"] == "interleaved"


def test_paper_rows_end_to_end_tiny_encoder_decoders(tmp_path, monkeypatch):
    groups = {
        "pair": paper_rows.PaperGroup("pair", "tiny encoder-decoders", (
            paper_rows.PaperRow("tiny", "tiny dense: 0.2 s", 0.2, None, TINY_ENCDEC),
            paper_rows.PaperRow("tiny", "tiny sparse: 0.1 s", 0.1, "tiny[arch=encdec,n_encoder_layers=1,"
                           "objective=span_corruption]", TINY_SPARSE_ENCDEC),
            paper_rows.PaperRow("tiny", "tiny terraformer", None, "tiny[arch=encdec,n_encoder_layers=1,"
                           "objective=span_corruption]", TINY_TERRAFORMER_ENCDEC),
        )),
        "seq": paper_rows.PaperGroup("seq", "one at a time", (
            paper_rows.PaperRow("tiny", "tiny dense", None, None, TINY_ENCDEC),), interleave=False, tokens=3, repeats=2),
    }
    monkeypatch.setattr(paper_rows, "PAPER_GROUPS", groups)
    report = bench.main(["--paper_rows", "--paper_groups=pair,seq", "--tokens=4", "--repeats=2",
                         "--per_call_tokens=3", "--prompt_len=5", "--bandwidth_mb=16", f"--out_dir={tmp_path}"])
    data = json.loads((tmp_path / "decode_paper_cpu.json").read_text())
    assert (tmp_path / "decode_paper_cpu.png").stat().st_size > 0
    assert not (tmp_path / "decode_cpu.json").exists()  # the decoder-only file is left alone
    assert [g["schedule"] for g in data["groups"]] == ["interleaved", "sequential"]
    assert "not interleaved" in data["groups"][1]["schedule_note"] and data["groups"][1]["tokens"] == 3
    dense, sparse, terra, seq = data["results"]
    for r in data["results"]:
        for key in ("paper_row", "paper_group", "speedup_vs", "ms_per_token", "per_call_ms_per_token", "prefill_ms",
                    "dtype", "decode_start_index", "n_encoder_layers", "schedule"):
            assert key in r, key
        assert r["arch"] == "encdec" and r["prompt"] == "encoder input" and r["dtype"] == "float32"
        assert r["decode_start_index"] == 1  # decoding continues after the start token
        assert r["ms_per_token"] > 0 and r["per_call_ms_per_token"] > 0 and r["prefill_ms"] > 0
        assert r["per_call_matches_loop"]  # greedy: both modes decode the same tokens from the same encoding
    assert dense["decode_cache_len"] == 1 + 4 and seq["decode_cache_len"] == 1 + 3
    assert dense["speedup_vs"]["in_loop"] == pytest.approx(1.0) and dense["speedup_vs"]["paper"] == pytest.approx(1.0)
    assert sparse["speedup_vs"]["baseline"] == dense["preset"] and sparse["paper_row"] == "tiny sparse: 0.1 s"
    assert sparse["speedup_vs"]["in_loop"] == pytest.approx(dense["ms_per_token"] / sparse["ms_per_token"])
    assert sparse["speedup_vs"]["per_call"] == pytest.approx(
        dense["per_call_ms_per_token"] / sparse["per_call_ms_per_token"])
    assert sparse["speedup_vs"]["paper"] == pytest.approx(2.0)
    assert terra["reversible"] and terra["speedup_vs"]["paper"] is None
    assert report["results"][0]["paper_group"] == "pair"

    # Re-running one group keeps the other group's rows in the file.
    bench.main(["--paper_rows", "--paper_groups=seq", "--tokens=2", "--repeats=1", "--per_call_tokens=2",
                "--prompt_len=5", "--bandwidth_mb=16", "--no_plot", f"--out_dir={tmp_path}"])
    data = json.loads((tmp_path / "decode_paper_cpu.json").read_text())
    assert [r["paper_group"] for r in data["results"]] == ["pair", "pair", "pair", "seq"]
    assert data["results"][3]["decode_cache_len"] == 1 + 3  # the group's own token count
