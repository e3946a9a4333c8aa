"""The paper's ~800M "Sparse FF+QKV" model (reference.md §5): sparse FFN (N 64, d_ff 6144) and sparse QKV
(S 16); within 6% of medium_dense's parameters (`python -m scaling_sparse params` reports both)."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("medium_sparse_ff")
    c.model.update(attn_sparsity=16, attn_length_kernel=3, attn_output="none")
    return c
