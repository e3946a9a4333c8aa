"""Setting up the decode benchmark's models (benchmarks/decode_latency.py): a preset's config in the
benchmark dtype, random weights, its compiled timer and what its result row reports about it."""

from __future__ import annotations

import jax.numpy as jnp

from benchmarks import models, reporting
from benchmarks.decode_timing import DecodeTimer, make_timer, run_timers
from scaling_sparse.decode import Decoder


def prepare_preset(name: str, args, *, backend: str, capacity_bytes: int, config=None) -> tuple[dict, DecodeTimer]:
    """(what the result reports about the preset, its compiled timer). `config`: an already
    overridden config in the benchmark dtype (the paper rows), else the preset's (models.benchmark_config)."""
    if config is None:
        config, full_layers, layers_note = models.benchmark_config(
            name, dtype=args.dtype, large_layers=args.large_layers, backend=backend, capacity_bytes=capacity_bytes)
    else:
        full_layers, layers_note = config.model.n_layers, f"all {config.model.n_layers} layers"
    m = config.model
    encdec = m.arch == "encdec"
    counts = models.param_report(config)
    if encdec:
        if args.prompt_len > m.max_len or 1 + max(args.tokens, args.per_call_tokens) > m.max_len:
            raise SystemExit(f"--prompt_len or --tokens exceed {name}'s model.max_len {m.max_len}: ask for fewer")
    elif args.prompt_len + max(args.tokens, args.per_call_tokens) > m.max_len:
        raise SystemExit(f"--prompt_len + --tokens exceed {name}'s model.max_len {m.max_len}: ask for fewer")
    decoder, init_s = models.build_decoder(config, seed=args.seed,
                                           cpu_kernels=False if args.cpu_kernels == "off" else None)
    timer = make_timer(decoder, config, args)
    cache_bytes = 2 * m.n_layers * (args.prompt_len + max(args.tokens, args.per_call_tokens)) * m.d_model
    if encdec:  # self-attention K/V over the decoder positions + the prompt's cross K/V (or prefix), per layer
        cache_bytes = 2 * m.n_layers * (timer.cache_len + args.prompt_len) * m.d_model
    meta = {
        "preset": name,
        "size_group": models.size_group(name),
        "dense": models.is_dense(m),
        "n_layers": m.n_layers,
        "full_n_layers": full_layers,
        "layers_note": layers_note,
        "dtype": args.dtype,
        "d_model": m.d_model, "d_ff": m.d_ff, "ff_sparsity": m.ff_sparsity, "attn_sparsity": m.attn_sparsity,
        "loss_sparsity": m.loss_sparsity, "reversible": bool(m.reversible), "weights": m.weights,
        # Which decode path ran: the compiled CPU kernels for the sparse layers, or pure JAX.
        "decode_path": "cpu_kernels" if timer.kernel_targets else "jax",
        "cpu_kernel_targets": timer.kernel_targets,
        "params_per_token": counts["params_per_token"],
        "total_params": counts["total_params"],
        "bytes_per_token": reporting.bytes_per_token(counts["params_per_token"], args.dtype),
        # The attention also reads its whole (masked) KV cache per token: not weights, listed apart.
        "kv_cache_bytes_per_token": cache_bytes * jnp.dtype(args.dtype).itemsize,
        "init_s": init_s,
    }
    if models.init_mode(config) != "threefry":
        meta["init_prng"] = f"{models.init_mode(config)} (weights over models.RBG_INIT_BYTES)"
    if encdec:
        meta.update({"arch": "encdec", "n_encoder_layers": m.n_encoder_layers or m.n_layers,
                     "prompt": "encoder input", "decode_start_index": timer.start_index,
                     "decode_cache_len": timer.cache_len})
    return meta, timer


def jax_path_twin(name: str, meta: dict, timer: DecodeTimer, args) -> tuple[dict, DecodeTimer] | None:
    """--cpu_kernels=compare: the same weights decoded on the pure-JAX path, timed beside the kernel
    path in the same run (None where the preset did not use the kernels: dense, or none loaded)."""
    if meta["decode_path"] != "cpu_kernels":
        return None
    kernel_decoder = timer.decoder
    decoder = Decoder(kernel_decoder.graphdef, kernel_decoder.params, max_len=kernel_decoder.max_len,
                      cpu_kernels=False)
    print(f"preparing {name} on the pure-JAX path ...", flush=True)
    twin = make_timer(decoder, timer.config, args)
    return {**meta, "decode_path": "jax", "cpu_kernel_targets": twin.kernel_targets, "label": f"{name}@jax"}, twin


def int8_twin(name: str, meta: dict, timer: DecodeTimer, args) -> tuple[dict, DecodeTimer]:
    """--weights=both: the same weights quantised to int8 (quantize.py, docs/quantization.md) and decoded
    beside the float ones in the same run; its read floor counts one byte per weight and a float32 scale
    per d_model weights (a scale per output channel or row)."""
    from scaling_sparse import sharding
    from scaling_sparse.state import convert_weights

    source = timer.decoder
    config = timer.config
    mesh = sharding.single_device_mesh()
    print(f"preparing {name} with int8 weights ...", flush=True)
    graphdef, params = convert_weights(config.model, source.params, "int8", mesh, sharding.logical_rules(config.mesh))
    decoder = Decoder(graphdef, params, max_len=source.max_len, cpu_kernels=False if args.cpu_kernels == "off" else None)
    twin = make_timer(decoder, config, args)
    per_token = meta["params_per_token"]
    return {**meta, "label": f"{name}@int8", "weights": "int8",
            "decode_path": "cpu_kernels" if twin.kernel_targets else "jax", "cpu_kernel_targets": twin.kernel_targets,
            "bytes_per_token": int(per_token * (1 + 4 / config.model.d_model))}, twin


def finish_preset(meta: dict, timer: DecodeTimer, bandwidth: dict) -> dict:
    timing = timer.summary()
    return {**meta, **reporting.bandwidth_figures(meta["bytes_per_token"], timing["ms_per_token"], bandwidth),
            **timing}


def time_presets(pairs: list[tuple[dict, DecodeTimer]], args, bandwidth: dict) -> list[dict]:
    """Times prepared (meta, timer) pairs together, their repeats round-robin -> their result rows, each
    printed as it is made."""
    run_timers([timer for _, timer in pairs], args)
    rows = [finish_preset(meta, timer, bandwidth) for meta, timer in pairs]
    for row in rows:
        print(reporting.decode_line(row), flush=True)
    return rows


def fits_together(presets: list[str], args, capacity_bytes: int) -> bool:
    """Whether every preset's weights fit memory at once (then their repeats are interleaved)."""
    total = sum(models.weight_bytes(n, args.dtype) for n in presets)
    return models.size_group(presets[0]) != "large" and total <= 0.6 * capacity_bytes
