"""The paper's ~800M model with sparse QKV (reference.md §5): medium_dense with a multiplicative layer of
S = 16 modules (M = 64 = d_head) and length kernel 3; no attention output projection."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("medium_dense")
    c.model.update(attn_sparsity=16, attn_length_kernel=3, attn_output="none")
    return c
