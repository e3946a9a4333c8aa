"""SVD and activation-aware SVD (ASVD) factorisation of a trained dense model (docs/compression.md).

Every attention matrix (Q, K, V, output) and both FFN matrices W [d_in, d_out] become a factor pair
a [d_in, r] @ b [r, d_out] (layers/dense.py LowRankDense); embeddings, norms and the output layer
are kept.
  SVD:  W = U S V^T;  a = U_r sqrt(S_r),  b = sqrt(S_r) V_r^T   (the best rank-r approximation of W).
  ASVD (Yuan et al. 2023, arXiv:2312.05821): input channel i scaled by s_i = mean|x_i|^alpha over
        calibration tokens (alpha 0.5, the paper's), so the truncation keeps what the activations use:
        diag(s) W = U S V^T;  a = diag(1/s) U_r sqrt(S_r),  b = sqrt(S_r) V_r^T   (the scaling folded
        back: x a b approximates x W, and at full rank equals it).
"""

from __future__ import annotations

import numpy as np
from flax import traverse_util

from scaling_sparse.compress import workdir as wd

ALPHA = 0.5            # ASVD's scaling exponent (the paper's default)
SCALE_FLOOR = 1e-6     # a channel never active in calibration would get s = 0: floor it (relative to the max)
MATRICES = {"attn": ("qkv/q", "qkv/k", "qkv/v", "out"), "ffn": ("w_in", "w_out")}


def rank_for_keep(keep: float, d_in: int, d_out: int) -> int:
    """The rank keeping `keep` of a [d_in, d_out] matrix's parameters: r (d_in + d_out) = keep d_in d_out."""
    return max(1, int(keep * d_in * d_out / (d_in + d_out)))


def factorise(w: np.ndarray, rank: int, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """w [d_in, d_out] -> (a [d_in, rank], b [rank, d_out]); `scale` [d_in]: ASVD's channel scaling."""
    w64 = np.asarray(w, np.float64)
    if scale is not None:
        w64 = np.asarray(scale, np.float64)[:, None] * w64
    u, s, vt = np.linalg.svd(w64, full_matrices=False)
    root = np.sqrt(s[:rank])
    a, b = u[:, :rank] * root, root[:, None] * vt[:rank]
    if scale is not None:
        a = a / np.asarray(scale, np.float64)[:, None]
    return a.astype(w.dtype), b.astype(w.dtype)


def asvd_scale(abs_mean: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    s = np.power(np.asarray(abs_mean, np.float64), alpha)
    return np.maximum(s, SCALE_FLOOR * max(float(s.max()), 1e-30))


def linear_paths(m) -> list[tuple[str, tuple]]:
    """[(kind "attn" | "ffn", path of the Dense layer's dict)] for every matrix to factorise."""
    out = []
    for i in range(m.n_layers):
        for kind, names in MATRICES.items():
            for name in names:
                out.append((kind, ("stack", "blocks", i, kind, *name.split("/"))))
    return out


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def factorise_params(params: dict, m, *, rank_attn: int, rank_ff: int, scales: dict | None = None) -> dict:
    """The dense params with every attention / FFN {kernel, bias} replaced by {a, b, bias}."""
    flat = dict(traverse_util.flatten_dict(params))
    for kind, path in linear_paths(m):
        kernel = np.asarray(flat.pop((*path, "kernel")))
        scale = None if scales is None else asvd_scale(scales[path])
        a, b = factorise(kernel, rank_attn if kind == "attn" else rank_ff, scale)
        flat[(*path, "a")], flat[(*path, "b")] = a, b
    return traverse_util.unflatten_dict(flat)


def compress_svd(config, workdir, out, *, method: str, rank: int | None, keep: float | None,
                 calibration_batches: int = 8, step: int | None = None, echo=print) -> dict:
    m = wd.check_dense_source(config)
    wd.check_out(workdir, out)
    if (rank is None) == (keep is None):
        raise ValueError("give exactly one of rank or keep")
    if rank is not None:
        rank_attn = rank_ff = int(rank)
    else:
        rank_attn = rank_for_keep(keep, m.d_model, m.n_heads * m.head_dim)
        rank_ff = rank_for_keep(keep, m.d_model, m.d_ff)
    for kind, r, d_in, d_out in (("attention", rank_attn, m.d_model, m.n_heads * m.head_dim),
                                 ("FFN", rank_ff, m.d_model, m.d_ff)):
        if r * (d_in + d_out) >= d_in * d_out:
            echo(f"warning: rank {r} factor pairs are no smaller than the {kind}'s dense [{d_in}, {d_out}] matrices")
    new_config = wd.derived_config(config, factor_rank_attn=rank_attn, factor_rank_ff=rank_ff)
    graphdef, params, source_step, data_state = wd.load_teacher(config, workdir, step=step)
    scales = None
    if method == "asvd":
        from scaling_sparse.compress.calibration import input_abs_means
        from scaling_sparse.train import load_data

        data = load_data(config, workdir)  # a fresh iterator from the start: nothing on disk changes
        batches = [next(data.train) for _ in range(calibration_batches)]
        echo(f"asvd: activation statistics over {calibration_batches} calibration batches "
             f"({sum(b['inputs'].size for b in batches):,} tokens)")
        means = input_abs_means(graphdef, params, batches)
        scales = {path: means[path] for _, path in linear_paths(m)}
    elif method != "svd":
        raise ValueError(f"unknown factorisation method {method!r}: svd | asvd")
    new_params = factorise_params(params, m, rank_attn=rank_attn, rank_ff=rank_ff, scales=scales)
    before, after = wd.parameter_counts(config), wd.parameter_counts(new_config)
    summary = {"method": method, "rank": rank, "keep": keep, "rank_attn": rank_attn, "rank_ff": rank_ff,
               "alpha": ALPHA if method == "asvd" else None,
               "calibration_batches": calibration_batches if method == "asvd" else 0,
               "source_workdir": str(workdir), "source_step": source_step, "extra_steps": 0,
               "total_before": before["total"], "total_after": after["total"],
               "per_token_before": before["per_token"], "per_token_after": after["per_token"], "out": str(out)}
    wd.write_model(new_config, new_params, workdir, out, step=source_step, data_state=data_state,
                   provenance=summary, echo=echo)
    return summary
