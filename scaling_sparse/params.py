"""Parameter report: total parameters and parameters read per decoded token, per component.

Computed from the model's abstract shapes (state.model_spec), so the 800M and 17B presets are
reported without allocating a single weight. Parameters read per token are what bounds unbatched
decoding (docs/semantics.md §6): bytes_per_token = params_per_token x bytes of the compute dtype
(decoding casts the weights once to model.dtype); with int8 weights (docs/quantization.md) one byte per
parameter plus a float32 scale per d_model of them (a scale per output channel or row).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from scaling_sparse.config import ModelConfig
from scaling_sparse.layers.base import param_count

_SIZE_FIELDS = ("arch", "n_encoder_layers", "vocab_size", "d_model", "d_ff", "n_heads", "n_layers", "ff_sparsity", "ff_lowrank",
                "attn_sparsity", "attn_output", "loss_sparsity", "loss_type", "loss_lowrank", "reversible",
                "dtype", "param_dtype", "factor_rank_attn", "factor_rank_ff", "d_head", "layer_heads", "layer_d_ff")


def abstract_model(model_config):
    """The model (models.build_model) with ShapeDtypeStructs instead of arrays (no memory allocated)."""
    from scaling_sparse.config import ModelConfig
    from scaling_sparse.state import model_spec

    spec = model_spec(ModelConfig.from_config(model_config))
    return nnx.merge(spec.graphdef, spec.params)


def report_params(config, name: str | None = None) -> dict:
    """config: a full ConfigDict (or its .model) or a preset name. Returns a JSON-serialisable dict."""
    if isinstance(config, str):
        from scaling_sparse.config import load_config

        name, config = name or config, load_config(config)
    m = ModelConfig.from_config(config.model if "model" in config else config)
    model = abstract_model(m)
    components = model.components()
    total = sum(c["total"] for c in components.values())
    per_token = sum(c["per_token"] for c in components.values())
    # One layer: everything but the embeddings, the output layer and the final norm(s). An
    # encoder-decoder's total averages over both stacks; only decoder layers are read per token.
    final_norms = {"total": param_count(model.final_norm), "per_token": param_count(model.final_norm)}
    layers = {"total": m.n_layers, "per_token": m.n_layers}
    if m.arch == "encdec":
        final_norms["total"] += param_count(model.encoder_norm) if hasattr(model, "encoder_norm") else 0
        layers["total"] += m.encoder_layers
    per_layer = {
        key: (sum(components[k][key] for k in ("attention", "ffn", "norms")) - final_norms[key]) // layers[key]
        for key in ("total", "per_token")}
    sizes = {k: list(v) if isinstance(v := getattr(m, k), tuple) else v for k in _SIZE_FIELDS}
    if m.ff_sparsity:
        sizes["ff_lowrank"] = m.ff_rank  # the effective controller rank
    bytes_per_param = 1 + 4 / m.d_model if m.weights == "int8" else jnp.dtype(m.dtype).itemsize
    return {
        "config": name or "",
        "sizes": sizes,
        "total_params": int(total),
        "params_per_token": int(per_token),
        "bytes_per_token": int(per_token * bytes_per_param),
        "bytes_per_param": bytes_per_param,
        "per_layer": per_layer,
        "components": {k: {"total": int(v["total"]), "per_token": int(v["per_token"])}
                       for k, v in components.items()},
    }


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_report(report: dict) -> str:
    """A small fixed-width table of the report."""
    s = report["sizes"]
    title = report["config"] or "model"
    lines = [f"{title}: d_model {s['d_model']}, d_ff {s['d_ff']}, {s['n_layers']} layers, vocab {s['vocab_size']}, "
             f"ff_sparsity {s['ff_sparsity']}, attn_sparsity {s['attn_sparsity']}, "
             f"loss_sparsity {s['loss_sparsity']}, dtype {s['dtype']}" + _compressed_sizes(s),
             f"{'component':<12}{'total':>16}{'per token':>16}"]
    rows = list(report["components"].items()) + [("per layer", report["per_layer"]),
                                                 ("all", {"total": report["total_params"],
                                                          "per_token": report["params_per_token"]})]
    for name, c in rows:
        lines.append(f"{name:<12}{c['total']:>16,}{c['per_token']:>16,}")
    lines.append(f"total {_human(report['total_params'])} parameters; {_human(report['params_per_token'])} "
                 f"read per decoded token = {report['bytes_per_token'] / 2**20:.1f} MiB "
                 f"({report['bytes_per_param']} bytes each)")
    return "\n".join(lines)


def _compressed_sizes(s: dict) -> str:
    """The title's note on a compressed model's shape (docs/compression.md); empty for others."""
    parts = [f"{k} {s[k]}" for k in ("factor_rank_attn", "factor_rank_ff", "d_head") if s.get(k)]
    parts += [f"{k} {s[k]}" for k in ("layer_heads", "layer_d_ff") if s.get(k)]
    return "".join(f", {p}" for p in parts)
