"""A GPU user's first command: is the code right on this accelerator, and how fast is it?

  python benchmarks/accelerator_check.py            # on one GPU; planned to take at most 8 minutes
  python benchmarks/accelerator_check.py --smoke    # tiny shapes, any machine (the test suite runs it)

In one process, in this order (each section's seconds are in the JSON):
  1. decode equals the forward pass, token by token, for every layer / model variant
     (scaling_sparse/variants.py: the decoder-only and the encoder-decoder ones), in float32 (matmuls at
     full precision: no TF32) and in bfloat16;
  2. one training step on a mesh of every device present equals the same step on one device (loss,
     gradients, and in float32 the updated parameters; tests/sharded_equivalence.py does the same on 8
     virtual CPU devices), for the dense, sparse, Terraformer and encoder-decoder models, in float32 and
     bfloat16 (skipped, and said so, on one device);
  3. training throughput in bfloat16 (benchmarks/train_throughput.py): tokens/s and MFU, against the
     matmul rate measured in the same run and, where the device is known, its datasheet peak;
  4. unbatched decode latency (benchmarks/decode_latency.py): ms/token, dense vs sparse;
  5. peak device memory (the allocator's high-water mark, where the backend reports one).
Writes one JSON, accelerator_check_<cpu|gpu>[_smoke].json, to --out_dir: $OUT when that is set (the
device machine's output folder), else benchmarks/results/. Exit status 1 if any check of 1-2 failed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and the checkout importable
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import equivalence, machine, reporting  # noqa: E402
from scaling_sparse import variants  # noqa: E402
from scaling_sparse.models import build_model  # noqa: E402
from scaling_sparse.models.encdec import decoder_inputs_for  # noqa: E402

# Decode vs forward: float32 element by element with the tests' tolerance (atol = rtol = 1e-4). bfloat16
# keeps 8 mantissa bits and the two paths round at different points (a cached key, a gathered row, a sum
# over another split): a position agrees when its largest difference is a few bf16 ulps of the largest
# logit (2^-5 of it; each single sparse layer stays within 1.5%). Where rounding ties two candidates of a
# discrete choice (the sparse FFN's block, ...) the choice can flip at one position, which then differs
# by up to ~15% of the largest logit (seen: 1 to 3 positions of 24 in the smoke variants, greedy tokens all
# equal): bfloat16 passes when at least BF16_POSITIONS of the positions agree and the greedy tokens do
# (BF16_TOKENS); a decode bug (a wrong cache, position or dtype) breaks nearly every position.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2 ** -5}
BF16_POSITIONS, BF16_TOKENS = 0.75, 0.9
# Sharded vs one device: float reordering only. float32: the loss and gradients relative to the largest
# gradient, the updated parameters absolute (tests/test_sharding.py's bounds). bfloat16 compute sums the
# partitions' partial results in bf16 (8 mantissa bits) in another order: the loss and the gradients agree
# to a few bf16 ulps of the largest gradient (seen on 2 CPU devices: 0.38 and 0.53 of 15, ulp 0.0625); the
# updated parameters are recorded, not checked: Adafactor's normalised step turns a gradient that is
# rounding noise into a full-size step of either sign (0.32 seen on fsdp=2).
GRAD_TOLERANCE = {"float32": 1e-5, "bfloat16": 0.05}
PARAM_TOLERANCE = {"float32": 1e-5, "bfloat16": None}
SHARDED_MODELS = ("dense", "sparse_all", "terraformer", "encdec")
# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, no sparsity), for MFU as usually quoted.
DATASHEET_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

TRAIN_PRESETS = "stdlib,stdlib_sparse,medium_dense,medium_sparse_all"
DECODE_PRESETS = "medium_dense,medium_sparse_ff,medium_sparse_qkv,medium_sparse_all,terraformer_medium"
# --smoke: the code paths at tiny shapes (the decode settings match tests/test_benchmark.py's tiny run, so
# the test suite's compilation cache serves both).
SMOKE = {"variants": ("sparse_all", "terraformer_one_chunk"), "encdec_variants": ("terraformer",),
         "sharded_models": ("sparse_all",), "train_presets": "tiny,tiny[ff_sparsity=8,attn_sparsity=4,loss_sparsity=4]",
         "decode_presets": "tiny,tiny_terraformer"}


# --------------------------------------------------------------------------------------------
# 1. Decode equals the forward pass

def _decoder_only_logits(fields: dict, dtype: str, length: int = 12):
    """(forward logits, token-by-token decode logits) of a tiny decoder-only variant."""
    model = build_model(variants.tiny_config(dtype=dtype, **fields).model, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, model.vocab_size, (2, length)), jnp.int32)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, mode="eval"))(state, tokens)
    step = jax.jit(lambda s, t, c, i: nnx.merge(graphdef, s).decode(t, c, i))
    cache, steps = model.init_cache(2, length + 4), []
    for i in range(length):
        logits, cache = step(state, tokens[:, i:i + 1], cache, jnp.asarray(i, jnp.int32))
        steps.append(logits)
    return forward, jnp.concatenate(steps, 1)


def _encdec_logits(fields: dict, dtype: str, length: int = 9):
    """(forward logits, token-by-token decode logits) of a tiny encoder-decoder variant (unpadded inputs:
    the Terraformer's decoding takes unpadded prompts)."""
    model = build_model(variants.tiny_encdec_config(dtype=dtype, **fields).model, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    inputs = jnp.asarray(rng.integers(1, 64, (2, 12)), jnp.int32)
    decoder_inputs = jnp.asarray(decoder_inputs_for(rng.integers(1, 64, (2, length))), jnp.int32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, i, d: nnx.merge(graphdef, s)(i, d))(state, inputs, decoder_inputs)
    start = jax.jit(lambda s, i: nnx.merge(graphdef, s).start_cache(i, length))
    step = jax.jit(lambda s, t, c, i: nnx.merge(graphdef, s).decode(t, c, i))
    cache, steps = start(state, inputs), []
    for t in range(length):
        logits, cache = step(state, decoder_inputs[:, t:t + 1], cache, jnp.asarray(t, jnp.int32))
        steps.append(logits)
    return forward, jnp.concatenate(steps, 1)


def decode_checks(names: tuple, encdec_names: tuple, dtypes: tuple) -> list[dict]:
    """Every variant in each dtype, and in float32 with int8 weights (docs/quantization.md: the pure-JAX int8
    path is the one accelerators run)."""
    rows = []
    for dtype, weights in [(dtype, "float") for dtype in dtypes] + [("float32", "int8")]:
        for arch, table, logits_of in (("decoder", variants.VARIANTS, _decoder_only_logits),
                                       ("encdec", variants.ENCDEC_VARIANTS, _encdec_logits)):
            for name in (names if arch == "decoder" else encdec_names):
                start = time.perf_counter()
                fields = {**table[name], "weights": weights}
                forward, decoded = (np.asarray(x, np.float32) for x in logits_of(fields, dtype))
                diff, scale = np.abs(forward - decoded), float(np.abs(forward).max())
                tol = TOLERANCE[dtype]
                tokens = float(np.mean(forward.argmax(-1) == decoded.argmax(-1)))
                positions = float(np.mean(diff.max(-1) <= tol * max(scale, 1.0)))
                ok = bool(np.all(diff <= tol + tol * np.abs(forward)) if dtype == "float32"
                          else positions >= BF16_POSITIONS and tokens >= BF16_TOKENS)
                rows.append({"arch": arch, "variant": name, "dtype": dtype, "weights": weights, "ok": ok,
                             "max_abs_diff": float(diff.max()), "max_abs_logit": scale, "tolerance": tol,
                             "positions_within_tolerance": positions, "argmax_agreement": tokens,
                             "seconds": time.perf_counter() - start})
                print(f"  decode == forward  {arch:<8}{name:<24}{dtype:<9}{weights:<6} max |diff| {diff.max():.2e}  "
                      f"{'ok' if ok else 'FAILED'}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# 2. Sharded equals unsharded

def meshes_for(n: int) -> dict:
    """The meshes over n devices: data parallel and fully sharded (one mesh when n is 1)."""
    meshes = {f"data={n}": dict(data=n, fsdp=1, tensor=1)}
    if n > 1:
        meshes[f"fsdp={n}"] = dict(data=1, fsdp=n, tensor=1)
    return meshes


def sharded_checks(models: tuple, dtypes: tuple) -> list[dict]:
    n = jax.device_count()
    if n == 1:  # a mesh of one device is one device: nothing to compare
        return [{"skipped": "one device: run on a machine with several to compare sharded with unsharded"}]
    if 8 % n:  # the check's batch of 8 must divide over the devices
        return [{"skipped": f"{n} devices do not divide the batch of 8"}]
    rows = []
    for dtype in dtypes:
        for name in models:
            reference = None
            for mesh_name, mesh in meshes_for(n).items():
                start = time.perf_counter()
                figures, reference, _ = equivalence.compare_step(equivalence.MODELS[name], mesh, reference, dtype)
                tol = GRAD_TOLERANCE[dtype]
                ok = (abs(figures["loss"] - figures["ref_loss"]) <= tol * max(abs(figures["ref_loss"]), 1.0)
                      and figures["max_grad_diff"] <= tol * max(figures["grad_scale"], 1.0)
                      and (PARAM_TOLERANCE[dtype] is None or figures["max_param_diff"] <= PARAM_TOLERANCE[dtype]))
                rows.append({"model": name, "mesh": mesh_name, "dtype": dtype, "ok": bool(ok), "tolerance": tol,
                             **{k: figures[k] for k in ("loss", "ref_loss", "max_grad_diff", "grad_scale",
                                                        "max_param_diff")},
                             "seconds": time.perf_counter() - start})
                print(f"  sharded == one device  {name:<12}{mesh_name:<10}{dtype:<9} loss {figures['loss']:.5f} vs "
                      f"{figures['ref_loss']:.5f}, max grad diff {figures['max_grad_diff']:.2e}  "
                      f"{'ok' if ok else 'FAILED'}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# 3-5. Throughput, latency, memory

def datasheet_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in DATASHEET_BF16_PEAK.items() if name in kind), None)


def train_section(presets: str, smoke: bool, scratch: pathlib.Path) -> dict:
    from benchmarks import train_throughput

    argv = [f"--presets={presets}", "--dtype=bfloat16", f"--out_dir={scratch}", "--no_plot", "--repeats=3"]
    argv += ["--quick", "--repeats=2", "--batch_size=2", "--seq_len=16"] if smoke else []
    report = train_throughput.main(argv)
    peak = datasheet_peak()
    rows = [{"preset": r["preset"], "batch_size": r["batch_size"], "seq_len": r["seq_len"], "step_ms": r["step_ms"],
             "tokens_per_s": r["tokens_per_s"], "mfu_vs_measured_matmul": r["model_flops_fraction_of_peak"],
             "mfu_vs_datasheet": (r["model_flops_per_s"] / peak) if peak else None,
             "step_time_vs_dense": r["step_time_vs_dense"], "compile_s": r["compile_s"], "final_loss": r["final_loss"]}
            for r in report["results"]]
    return {"matmul_peak": report["matmul_peak"], "datasheet_bf16_peak_flops": peak, "rows": rows}


def decode_section(presets: str, smoke: bool, scratch: pathlib.Path) -> dict:
    from benchmarks import decode_latency

    # The float weights only: on an accelerator int8 runs the pure-JAX path (docs/quantization.md), checked above.
    argv = [f"--presets={presets}", f"--out_dir={scratch}", "--no_plot", "--repeats=3", "--weights=float"]
    argv += ["--quick", "--tokens=4", "--per_call_tokens=3", "--prompt_len=4", "--bandwidth_mb=16"] if smoke else []
    report = decode_latency.main(argv)
    rows = [{k: r.get(k) for k in ("preset", "dtype", "ms_per_token", "per_call_ms_per_token", "prefill_ms",
                                   "speedup_vs_dense", "bytes_per_token", "read_bandwidth_fraction", "decode_path")}
            for r in report["results"]]
    return {"bandwidth": report["bandwidth"], "rows": rows}


def peak_memory() -> dict | None:
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None  # the CPU backend reports none
    return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_limit", "bytes_in_use")}


# --------------------------------------------------------------------------------------------
# Entry point

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and a few variants: checks that the script "
                                                        "runs end to end on any machine (the test suite's run)")
    p.add_argument("--out_dir", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    p.add_argument("--skip", default="", help="comma-separated sections to leave out: decode_equals_forward, "
                                              "sharded, train, decode_latency")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    smoke = args.smoke
    dtypes = ("float32", "bfloat16")
    info = machine.machine_info()
    print(f"accelerator check{' (smoke)' if smoke else ''}: {', '.join(info['devices'])}", flush=True)
    sections, seconds = {}, {}

    def section(name: str, run) -> None:
        if name not in skip:
            start = time.perf_counter()
            sections[name] = run()
            seconds[name] = time.perf_counter() - start

    # Correctness in float32 at full matmul precision (GPUs otherwise use TF32 for float32 dots).
    with jax.default_matmul_precision("highest"):
        section("decode_equals_forward", lambda: decode_checks(
            SMOKE["variants"] if smoke else tuple(variants.VARIANTS),
            SMOKE["encdec_variants"] if smoke else tuple(variants.ENCDEC_VARIANTS), dtypes))
        section("sharded", lambda: sharded_checks(SMOKE["sharded_models"] if smoke else SHARDED_MODELS, dtypes))
    with tempfile.TemporaryDirectory() as scratch:
        section("train", lambda: train_section(SMOKE["train_presets"] if smoke else TRAIN_PRESETS, smoke,
                                               pathlib.Path(scratch)))
        section("decode_latency", lambda: decode_section(SMOKE["decode_presets"] if smoke else DECODE_PRESETS, smoke,
                                                         pathlib.Path(scratch)))
    checks = [r for key in ("decode_equals_forward", "sharded") for r in sections.get(key, []) if "ok" in r]
    failed = [r for r in checks if not r["ok"]]
    report = {**reporting.run_header("accelerator check" + (" (smoke)" if smoke else ""), info),
              "checks_passed": not failed, "checks_run": len(checks), "checks_failed": len(failed),
              "seconds": seconds, "peak_memory": peak_memory(), **sections}
    kind = machine.machine_kind(jax.default_backend())
    reporting.write_json(pathlib.Path(args.out_dir) / f"accelerator_check_{kind}{'_smoke' if smoke else ''}.json",
                         report)
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["checks_passed"] else 1)
