"""The paper's ~800M model with a sparse FFN (reference.md §5): medium_dense with N = 64 units per block
and d_ff raised to 6144 (the reference's choice, keeping the parameter count close to dense);
controller rank d_ff / N = 96."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("medium_dense")
    c.model.update(ff_sparsity=64, d_ff=6144, ff_lowrank=0)
    return c
