"""The paper's 17B-row sparse model (reference.md §5): d 9216, 96 heads, sparse FFN with N 256 units per
block, controller rank 32, d_ff 65536; sparse QKV with S 64 modules (M 144, not aligned with the heads);
multiplicative loss layer with 4 modules.

Only a slice of the layers by default (n_layers = 2), as in large_dense; --config.model.n_layers=N for more.
"""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("large_dense")
    c.model.update(ff_sparsity=256, ff_lowrank=32, d_ff=65536, attn_sparsity=64, attn_length_kernel=3,
                   attn_output="none", loss_sparsity=4, loss_type="mult")
    return c
