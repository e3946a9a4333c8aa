"""The demo with every sparsity on: the stdlib preset (d 256, 4 heads, vocab 4096) with a sparse FFN of
N = 64 units per block (d_ff 1536 = 24 blocks, raised 1.5x as the paper's 4096 -> 6144; rank 24),
sparse QKV with S = 4 modules (M 64 = d_head) and a multiplicative loss layer with 4 modules."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("stdlib")
    c.model.update(ff_sparsity=64, d_ff=1536, ff_lowrank=0, attn_sparsity=4, attn_length_kernel=3,
                   attn_output="none", loss_sparsity=4, loss_type="mult")
    return c
