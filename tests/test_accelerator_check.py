"""benchmarks/accelerator_check.py, the GPU user's first command, in its CPU smoke mode (tiny shapes, a
few variants): every section runs and writes the JSON a GPU run writes, so the script cannot rot while
no GPU is lent."""

import json

from benchmarks import accelerator_check


def test_smoke_run_checks_measures_and_writes_one_json(tmp_path):
    report = accelerator_check.main(["--smoke", f"--out_dir={tmp_path}"])
    saved = json.loads((tmp_path / "accelerator_check_cpu_smoke.json").read_text())
    assert saved["checks_passed"] and report["checks_passed"], [
        r for key in ("decode_equals_forward", "sharded") for r in saved[key] if not r["ok"]]
    # Decode equals forward: each smoke variant (2 decoder-only, 1 encoder-decoder) in float32 and bfloat16.
    rows = saved["decode_equals_forward"]
    assert {(r["variant"], r["dtype"]) for r in rows} == {
        (v, d) for v in ("sparse_all", "terraformer_one_chunk", "terraformer") for d in ("float32", "bfloat16")}
    for r in rows:  # float32 agrees everywhere; bfloat16 at most positions (accelerator_check.TOLERANCE)
        assert r["positions_within_tolerance"] == 1.0 if r["dtype"] == "float32" else (
            r["positions_within_tolerance"] >= accelerator_check.BF16_POSITIONS)
        assert r["argmax_agreement"] >= accelerator_check.BF16_TOKENS
    # Sharded equals one device on the devices present (one CPU device here: the data=1 mesh).
    assert [(r["model"], r["mesh"], r["dtype"]) for r in saved["sharded"]] == [
        ("sparse_all", "data=1", "float32"), ("sparse_all", "data=1", "bfloat16")]
    train = saved["train"]["rows"]
    assert [r["preset"] for r in train] == ["tiny", "tiny[ff_sparsity=8,attn_sparsity=4,loss_sparsity=4]"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu_vs_measured_matmul"] for r in train)
    assert saved["train"]["datasheet_bf16_peak_flops"] is None  # a CPU has no datasheet entry
    decode = saved["decode_latency"]["rows"]
    assert [r["preset"] for r in decode] == ["tiny", "tiny_terraformer"] and all(r["ms_per_token"] > 0 for r in decode)
    assert set(saved["seconds"]) == {"decode_equals_forward", "sharded", "train", "decode_latency"}
    assert saved["machine"]["devices"] and "peak_memory" in saved  # None on the CPU backend
    assert saved["checks_run"] == len(rows) + len(saved["sharded"])
