"""benchmarks/accelerator_check.py, the GPU user's first command, in its smoke mode (tiny shapes, a few
variants) on 2 virtual CPU devices: every section runs and writes the JSON a GPU run writes, the sharded
comparison included, so the script cannot rot while no GPU is lent."""

import json
import os
import pathlib
import subprocess
import sys

from benchmarks import accelerator_check
from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_smoke_run_checks_measures_and_writes_one_json(tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"), JAX_PLATFORMS="cpu")
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accelerator_check.py"), "--smoke",
                           f"--out_dir={tmp_path}"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = json.loads((tmp_path / "accelerator_check_cpu_smoke.json").read_text())
    assert saved["checks_passed"] and saved["checks_failed"] == 0
    # Decode equals forward: each smoke variant (2 decoder-only, 1 encoder-decoder) in float32 and bfloat16, and
    # in float32 with int8 weights.
    rows = saved["decode_equals_forward"]
    assert {(r["variant"], r["dtype"], r["weights"]) for r in rows} == {
        (v, d, w) for v in ("sparse_all", "terraformer_one_chunk", "terraformer")
        for d, w in (("float32", "float"), ("bfloat16", "float"), ("float32", "int8"))}
    for r in rows:  # float32 agrees everywhere; bfloat16 at most positions (accelerator_check.TOLERANCE)
        assert r["positions_within_tolerance"] == 1.0 if r["dtype"] == "float32" else (
            r["positions_within_tolerance"] >= accelerator_check.BF16_POSITIONS)
        assert r["argmax_agreement"] >= accelerator_check.BF16_TOKENS
    # Sharded equals one device, on the 2 devices present: data and fsdp meshes, both dtypes.
    sharded = saved["sharded"]
    assert [(r["model"], r["mesh"], r["dtype"]) for r in sharded] == [
        ("sparse_all", mesh, dtype) for dtype in ("float32", "bfloat16") for mesh in ("data=2", "fsdp=2")]
    assert all(r["loss"] == r["loss"] and r["max_grad_diff"] <= r["tolerance"] * r["grad_scale"] for r in sharded)
    train = saved["train"]["rows"]
    assert [r["preset"] for r in train] == ["tiny", "tiny[ff_sparsity=8,attn_sparsity=4,loss_sparsity=4]"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu_vs_measured_matmul"] for r in train)
    assert saved["train"]["datasheet_bf16_peak_flops"] is None  # a CPU has no datasheet entry
    decode = saved["decode_latency"]["rows"]
    assert [r["preset"] for r in decode] == ["tiny", "tiny_terraformer"] and all(r["ms_per_token"] > 0 for r in decode)
    assert set(saved["seconds"]) == {"decode_equals_forward", "sharded", "train", "decode_latency"}
    assert saved["machine"]["device_count"] == 2 and "peak_memory" in saved  # None on the CPU backend
    assert saved["checks_run"] == len(rows) + len(sharded)
    assert f"{len(rows) + len(sharded)} passed, 0 failed" in done.stdout
