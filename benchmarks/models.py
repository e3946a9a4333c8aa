"""Model set-up shared by the decode benchmarks: a preset's config in the benchmark dtype, the
layer plan of the 17B-width presets, random weights from the state builder, and the Decoder.

Weights come from `scaling_sparse.state.init_params` on a single-device mesh: the layers' own
initialisers in one jitted call with its output shardings, floating weights in the benchmark dtype,
so no float32 copy of a bfloat16 model is made (17B in bfloat16 fits an 80 GB GPU). Latency does
not depend on the values (docs/benchmarks.md, "Unbatched decode latency"). Parameter counts come
from the abstract model (`scaling_sparse.params.report_params`), so nothing is allocated to plan.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp

from scaling_sparse import sharding, state
from scaling_sparse.config import ModelConfig, load_config, validate
from scaling_sparse.decode import Decoder
from scaling_sparse.params import report_params

# How the weights are made, as the JSON's settings record it ("model": the layers' own initialisers).
INIT = "model"
# Share of device memory the weights may take when deciding how many 17B-width layers fit.
MEMORY_HEADROOM = 0.85
CPU_LARGE_LAYERS = 2  # the reference implementation timed a slice too (docs/benchmarks.md, "17B width")
# Depth of the full 17B-class decoder: 15 blocks of 1.09B (d 9216, d_ff 40960) + 0.6B embedding and output
# = 17B parameters, 34 GB in bfloat16. The large_* presets themselves hold a 2-layer slice.
LARGE_FULL_LAYERS = 15
# Models with more weight bytes than this draw their random weights with XLA's RngBitGenerator (`init_mode`).
RBG_INIT_BYTES = 4 << 30


# --------------------------------------------------------------------------------------------
# Presets

def size_group(preset: str) -> str:
    """medium_sparse_ff -> medium, large_dense -> large, terraformer_medium -> medium, tiny -> tiny."""
    parts = pathlib.Path(preset).stem.split("_")
    if parts[0] == "terraformer" and len(parts) > 1:
        return parts[1]
    return parts[0]


def is_dense(model_cfg) -> bool:
    """The baseline of a size group: no sparse layer and the standard (non-reversible) stack."""
    m = model_cfg
    return not (m.ff_sparsity or m.attn_sparsity or m.loss_sparsity or m.loss_lowrank or m.reversible
                or m.attention != "full" or m.ff_sru_units)


def param_report(config) -> dict:
    """params_per_token and total_params of a config, without allocating the weights."""
    r = report_params(config)
    return {"params_per_token": int(r["params_per_token"]), "total_params": int(r["total_params"])}


def with_overrides(config, *, dtype: str, n_layers: int | None = None):
    """Weights stored in the decode dtype (the decode layout: nothing is cast per token), dropout 0."""
    config = config.copy_and_resolve_references()
    config.model.dtype = dtype
    config.model.param_dtype = dtype
    config.model.dropout = 0.0
    config.model.attn_dropout = 0.0
    if n_layers:
        config.model.n_layers = n_layers
    return validate(config)


def large_layers_plan(config, requested: int | None, *, backend: str, capacity_bytes: int,
                      dtype: str, full: int = LARGE_FULL_LAYERS) -> tuple[int, str]:
    """How many blocks of a 17B-width preset to time, and why.

    requested > 0: that many. CPU: a slice of CPU_LARGE_LAYERS (the full model does not fit host
    memory in float32). GPU: the full decoder when its weights fit MEMORY_HEADROOM of device memory,
    else as many blocks as fit (per-block size from the 1- and 2-layer parameter reports).
    """
    if requested:
        return min(requested, full), f"{min(requested, full)} of {full} layers (--large_layers)"
    if backend == "cpu" or not capacity_bytes:
        n = min(CPU_LARGE_LAYERS, full)
        return n, f"{n} of {full} layers (slice: the full model does not fit host memory)"
    itemsize = jnp.dtype(dtype).itemsize
    one = param_report(with_overrides(config, dtype=dtype, n_layers=1))["total_params"]
    two = param_report(with_overrides(config, dtype=dtype, n_layers=2))["total_params"]
    per_layer, rest = two - one, 2 * one - two
    fits = int((MEMORY_HEADROOM * capacity_bytes / itemsize - rest) // per_layer)
    if fits >= full:
        return full, f"all {full} layers"
    n = max(fits, 1)
    return n, f"{n} of {full} layers (slice: {full} do not fit {capacity_bytes / 2**30:.0f} GiB)"


def benchmark_config(name: str, *, dtype: str, large_layers: int | None = None, backend: str = "cpu",
                     capacity_bytes: int = 0) -> tuple:
    """A preset as benchmarked -> (config, full_layers, layers_note): the config in `dtype`, sliced
    to the layer plan for the 17B-width presets; full_layers the depth of the whole model."""
    config = load_config(name)
    full_layers = config.model.n_layers
    n_layers, layers_note = None, f"all {full_layers} layers"
    if size_group(name) == "large":
        full_layers = max(LARGE_FULL_LAYERS, full_layers)
        n_layers, layers_note = large_layers_plan(config, large_layers, backend=backend,
                                                  capacity_bytes=capacity_bytes, dtype=dtype, full=full_layers)
    return with_overrides(config, dtype=dtype, n_layers=n_layers), full_layers, layers_note


def weight_bytes(name: str, dtype: str) -> int:
    """Bytes of a preset's benchmarked weights (17B-width presets: the CPU slice), from counts only."""
    n_layers = CPU_LARGE_LAYERS if size_group(name) == "large" else None
    total = param_report(with_overrides(load_config(name), dtype=dtype, n_layers=n_layers))["total_params"]
    return total * jnp.dtype(dtype).itemsize


# --------------------------------------------------------------------------------------------
# Weights and decoder

def init_mode(config) -> str:
    """The bit generator the weights are drawn with: "threefry" (JAX's default), or "rbg" (XLA's
    RngBitGenerator) for models over RBG_INIT_BYTES. The jitted init program keeps threefry's
    intermediates of the largest weights alive together: on CPU it asked for 34.7 GB to initialise
    the 9.1 GB bfloat16 paper_large_dense_slice, while with "rbg" the peak is the weights plus a
    little. Same initialisers, same distributions, other random values; latency does not depend on them."""
    return "rbg" if weight_bytes_of(config, config.model.param_dtype) > RBG_INIT_BYTES else "threefry"


def weight_bytes_of(config, dtype: str) -> int:
    return param_report(config)["total_params"] * jnp.dtype(dtype).itemsize


def build(config, *, seed: int = 0):
    """(graphdef, params) of a randomly initialised model, on one device, through the state builder
    (`state.init_params`): floating weights in `config.model.dtype` (with_overrides sets it); the
    bit generator of `init_mode`."""
    m = ModelConfig.from_config(config.model)
    mesh, rules = sharding.single_device_mesh(), sharding.logical_rules(config.mesh)
    if init_mode(config) == "threefry":
        graphdef, params = state.init_params(m, mesh, rules, seed=seed, dtype=m.dtype)
        return graphdef, jax.block_until_ready(params)
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        # The state builder's init program, traced afresh (not its per-config cache) under the rbg keys.
        params = state._init_params_program.__wrapped__(m, seed, mesh, tuple(rules), m.dtype)()
        return state.model_spec(m).graphdef, jax.block_until_ready(params)
    finally:
        jax.config.update("jax_default_prng_impl", previous)


def build_random_int8(config, *, seed: int = 0):
    """(graphdef, params) of the config's model with int8 weights (docs/quantization.md) drawn directly as int8,
    one parameter at a time: the float model is never built (a 17B model is 68 GB in float32; its int8 weights,
    17 GB, fit a 24 GB machine). Each int8 matrix holds uniform values in -127..127 with scales giving the
    dequantised weights a standard deviation of 1/sqrt(fan in) (the values sharing a scale), 0.5 for the
    multiplicative layers' gates (the reference's gate init); norms' scales 1, biases 0. Latency does not
    depend on the values; the controllers' choices vary with the input (decode_17b.py counts them)."""
    import dataclasses
    import math

    import numpy as np

    from scaling_sparse.quantize import LEVELS, Int8Weight

    m = dataclasses.replace(ModelConfig.from_config(config.model), weights="int8")
    spec = state.model_spec(m)
    rng = np.random.default_rng(seed)
    uniform_std = LEVELS / math.sqrt(3.0)  # of integers uniform in -127..127

    def draw(path, leaf):
        name = path[-1].key
        if not isinstance(leaf, Int8Weight):
            return jax.device_put(np.full(leaf.shape, 1.0 if name == "scale" else 0.0, np.float32))
        q = np.empty(leaf.q.shape, np.int8)
        flat = q.reshape(-1)
        for start in range(0, flat.size, 1 << 26):  # 64 MB at a time
            flat[start:start + (1 << 26)] = rng.integers(-LEVELS, LEVELS + 1, min(1 << 26, flat.size - start), np.int8)
        fan_in = math.prod(n for n, s in zip(leaf.q.shape, leaf.scale.shape) if s == 1 and n != 1)
        std = 0.5 if name == "gates" else 1.0 / math.sqrt(fan_in)
        weight = Int8Weight(jax.device_put(q), jax.device_put(np.full(leaf.scale.shape, std / uniform_std, np.float32)))
        del q, flat
        return weight

    params = jax.tree_util.tree_map_with_path(draw, spec.params, is_leaf=lambda x: isinstance(x, Int8Weight))
    return spec.graphdef, jax.block_until_ready(params)


def build_decoder(config, *, seed: int = 0, cpu_kernels: bool | None = None) -> tuple[Decoder, float]:
    """A greedy Decoder holding freshly initialised weights -> (decoder, seconds the weights took).
    cpu_kernels: the Decoder's choice of the compiled CPU decode kernels (None: automatic)."""
    start = time.perf_counter()
    graphdef, params = build(config, seed=seed)
    init_s = time.perf_counter() - start
    return Decoder(graphdef, params, max_len=config.model.max_len, cpu_kernels=cpu_kernels), init_s
