"""Compression baselines for a trained dense decoder (docs/compression.md): SVD and activation-aware
SVD factorisation (svd.py) and CoFi structured pruning with distillation (cofi.py); and weight-only int8
for any model (int8.py, docs/quantization.md). Each writes an ordinary workdir (workdir.py) that
evaluates, decodes and benchmarks with the normal code (and, but for int8, trains)."""

from __future__ import annotations

METHODS = ("svd", "asvd", "cofi", "int8")


def run_compress(config, workdir, out, *, method: str, rank: int | None = None, keep: float | None = None,
                 target_sparsity: float = 0.5, steps: int = 200, calibration_batches: int = 8,
                 step: int | None = None, echo=print) -> dict:
    """Compresses the dense model in `workdir` (its checkpoint `step`, default the latest) into `out`
    -> a summary dict (method, parameters before / after, extra training steps, ...)."""
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}: one of {METHODS}")
    from scaling_sparse.compress.workdir import claim_out

    with claim_out(workdir, out):  # one run per --out, from the start: a second stops before any work
        if method == "int8":
            from scaling_sparse.compress.int8 import compress_int8

            return compress_int8(config, workdir, out, step=step, echo=echo)
        if method in ("svd", "asvd"):
            from scaling_sparse.compress.svd import compress_svd

            return compress_svd(config, workdir, out, method=method, rank=rank, keep=keep,
                                calibration_batches=calibration_batches, step=step, echo=echo)
        from scaling_sparse.compress.cofi import compress_cofi

        return compress_cofi(config, workdir, out, target_sparsity=target_sparsity, steps=steps, step=step,
                             echo=echo)
