"""`compress --method=int8`: a trained model's weights as symmetric per-row int8 (quantize.py,
docs/quantization.md), written as an ordinary workdir (config model.weights="int8") that evaluates,
decodes and benchmarks with the normal code. Any decoder or encoder-decoder model, dense, sparse or
already compressed (SVD / ASVD / CoFi): quantisation composes with the other methods. No training
happens; the new workdir holds the source's step and data position and no optimizer state (int8
weights are not trained: `train` refuses them)."""

from __future__ import annotations

from scaling_sparse import sharding
from scaling_sparse.compress import workdir as wd
from scaling_sparse.config import ConfigError


def compress_int8(config, workdir, out, *, step: int | None = None, echo=print) -> dict:
    from scaling_sparse.state import convert_weights, params_bytes

    if config.model.get("weights", "float") == "int8":
        raise ConfigError(f"{workdir} already holds int8 weights (model.weights=int8). Fix: compress its float "
                          "source, or use this workdir as it is")
    wd.check_out(workdir, out)
    _, params, source_step, data_state = wd.load_teacher(config, workdir, step=step)
    new_config = wd.derived_config(config, weights="int8")
    mesh = sharding.single_device_mesh()
    _, new_params = convert_weights(config.model, params, "int8", mesh, sharding.logical_rules(config.mesh))
    counts = wd.parameter_counts(config)
    summary = {"method": "int8", "source_workdir": str(workdir), "source_step": source_step, "extra_steps": 0,
               "total_before": counts["total"], "total_after": counts["total"],
               "per_token_before": counts["per_token"], "per_token_after": counts["per_token"],
               "bytes_before": params_bytes(params), "bytes_after": params_bytes(new_params), "out": str(out)}
    echo(f"int8: {summary['bytes_before'] / 2**20:,.1f} MiB of weights -> {summary['bytes_after'] / 2**20:,.1f} MiB")
    wd.write_model(new_config, new_params, workdir, out, step=source_step, data_state=data_state,
                   provenance=summary, echo=echo)
    return summary
