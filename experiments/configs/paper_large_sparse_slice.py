"""The paper's 17B "Sparse FF+QKV" decode-timing row as the reference instantiates it (docs/semantics.md
§5): trax `decoding_timing_test.py`'s `big_transformer` sweep entry `ff_sparsity (256, 32)` + sparse QKV
(S 64, length kernel 3) with d_ff 65536, on the same slice as paper_large_dense_slice (1 encoder + 2
decoder blocks, d 9216, 96 heads, vocab 32000): the sparse FFN (N 256, controller rank 32) in the
encoder and the decoder, the multiplicative + convolution QKV (no output projection) in the decoder's
self-attention only, dense encoder attention and cross-attention, a dense loss layer (loss sparsity 0)."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("paper_large_dense_slice")
    c.model.update(ff_sparsity=256, ff_lowrank=32, d_ff=65536, attn_sparsity=64, attn_length_kernel=3,
                   attn_output="none", loss_sparsity=0)
    return c
