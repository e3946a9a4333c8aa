"""The paper's ~800M "Sparse FF+QKV" C4 model as the reference builds it (docs/semantics.md §5):
paper_medium_dense with the sparse FFN (N 64, d_ff 6144, controller rank 96) in the encoder and the
decoder, sparse QKV (S 16, length kernel 3, no output projection) in the decoder's self-attention only
(the encoder's self-attention and the cross-attention stay dense), and the multiplicative loss layer
(4 modules). `python -m scaling_sparse params` reports how its parameters compare with the dense one."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("paper_medium_dense")
    c.model.update(ff_sparsity=64, d_ff=6144, ff_lowrank=0, attn_sparsity=16, attn_length_kernel=3,
                   attn_output="none", loss_sparsity=4)
    return c
