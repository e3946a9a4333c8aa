"""Where a decoded token's time goes: XLA ops of the jitted decode loop, by time per token.

Runs one preset's decode loop (batch 1, decode_latency.py's set-up: benchmarks/decode_setup.py, models.py) under the
JAX profiler, reads the Perfetto trace, sums each XLA op's time and names it by the JAX operation it
came from (the HLO's op_name metadata). The profiler adds a few microseconds per op, so totals exceed the untraced
latency; the ranking is what to read.

    python benchmarks/profile_decode.py --preset=medium_sparse_all          # JSON under benchmarks/results/
    python benchmarks/profile_decode.py --preset=medium_dense --n_layers=4 --top=20
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import machine, models, reporting  # noqa: E402
from scaling_sparse.config import load_config  # noqa: E402

# Runtime events that wrap the ops rather than being ops.
_WRAPPERS = ("ThunkExecutor", "PjitFunction", "CommonPjRt", "ParseArguments", "SlinkyThreadPool", "end: ", "$")


def op_origins(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX operation it came from (op_name metadata, shortened), else its
    result shape (XLA leaves some dots without metadata)."""
    origins = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]+)"', line)
        origins[m.group(1)] = (re.sub(r"^jit\([^)]*\)/(while/body/)?(closed_call/)?", "", op.group(1)) if op
                               else m.group(2))
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target:  # name a kernel call by its kernel (docs/kernels.md), not by "ffi_call"
            origins[m.group(1)] = f"{origins[m.group(1)]}:{target.group(1)}"
    return origins


def profile(preset: str, *, n_layers: int | None, tokens: int, prompt_len: int, dtype: str,
            weights: str = "float") -> dict:
    config = models.with_overrides(load_config(preset), dtype=dtype, n_layers=n_layers)
    config.model.weights = weights  # int8: built quantised (docs/quantization.md)
    decoder, _ = models.build_decoder(config)
    params = decoder.params
    prompt = jnp.zeros((1, prompt_len), jnp.int32)
    rng = jax.random.PRNGKey(0)

    def run():
        cache = decoder.init_cache(params, 1, prompt_len + tokens)
        first, cache = decoder.prefill(params, prompt, cache, rng)
        out, _ = decoder.loop(params, cache, first, prompt_len, rng, tokens)
        jax.block_until_ready(out)

    run()
    run()  # compiled and warm
    cache = decoder.init_cache(params, 1, prompt_len + tokens)
    first, cache = decoder.prefill(params, prompt, cache, rng)
    origins = op_origins(decoder.loop.lower(params, cache, first, prompt_len, rng, tokens).compile().as_text())
    # Only the loop is traced: the prefill's ops (the whole prompt through the JAX path) are not a decoded
    # token's, and counted per token they had added ~1.5 ms to terraformer_medium's figure.
    cache = decoder.init_cache(params, 1, prompt_len + tokens)
    first, cache = jax.block_until_ready(decoder.prefill(params, prompt, cache, rng))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        jax.block_until_ready(decoder.loop(params, cache, first, prompt_len, rng, tokens))
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_op, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("dur") is not None and not e["name"].startswith(_WRAPPERS):
            by_op[e["name"]] += e["dur"]
            count[e["name"]] += 1
    # Group the per-layer copies of an op (fusion.3, fusion.7, ...) by their kind and the JAX operation
    # they come from, e.g. "gather [gather_bitcast_fusion]".
    by_origin, ops_of = collections.Counter(), collections.Counter()
    for name, us in by_op.items():
        kind = re.sub(r"\.\d+$", "", name)
        origin = f"{origins[name]} [{kind}]" if name in origins else kind
        by_origin[origin] += us / tokens
        ops_of[origin] += count[name] / tokens
    total = sum(by_origin.values())
    rows = [{"op": origin, "us_per_token": us, "share": us / total, "calls_per_token": ops_of[origin]}
            for origin, us in by_origin.most_common()]
    return {"preset": preset, "n_layers": config.model.n_layers, "dtype": dtype, "tokens": tokens,
            "traced_ms_per_token": total / 1e3, "ops": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="medium_sparse_all")
    p.add_argument("--n_layers", type=int, default=None, help="override the depth (default: the preset's)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--top", type=int, default=25, help="rows to print")
    p.add_argument("--weights", choices=("float", "int8"), default="float", help="int8: weights quantised to int8")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_profile_<kind>.json)")
    args = p.parse_args(argv)
    backend = jax.default_backend()
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    result = profile(args.preset, n_layers=args.n_layers, tokens=args.tokens, prompt_len=args.prompt_len, weights=args.weights,
                     dtype=dtype)
    result["machine"] = machine.machine_info()
    print(reporting.format_profile(result, args.top))
    out = args.out or ROOT / "benchmarks" / "results" / f"decode_profile_{machine.machine_kind(backend)}.json"
    reporting.write_json(out, result)
    return result


if __name__ == "__main__":
    main()
