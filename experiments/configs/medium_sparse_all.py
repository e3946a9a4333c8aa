"""The ~800M model with every sparsity on (reference.md §5-6): sparse FFN (N 64, d_ff 6144), sparse QKV
(S 16) and the multiplicative loss layer with 4 modules."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("medium_sparse_ffqkv")
    c.model.update(loss_sparsity=4, loss_type="mult")
    return c
