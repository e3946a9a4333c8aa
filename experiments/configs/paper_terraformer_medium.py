"""The Terraformer as the reference trains it on C4 (trax terraformer_c4_medium.gin; docs/semantics.md
§4, §5): an encoder-decoder with a reversible encoder (24 blocks, dense bidirectional attention) whose
two streams are each concatenated with the decoder's embeddings, and 24 reversible decoder blocks
with the multiplicative + convolution self-attention (sparse QKV, S 16, length kernel 3; not LSH in
C4 pre-training), the sparse FFN (N 64, d_ff 6144) with the SRU branch (32 units), the multiplicative
loss layer (4 modules), dropout 0.1; span corruption on C4 as paper_medium_dense. The reference's
FFN chunking (512) is a memory feature not implemented here; its max_len 32768 is for long
fine-tuning inputs (raise model.max_len for those; LSH via --config.model.attention=lsh)."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("paper_medium_sparse_ffqkv")
    c.model.update(reversible=True, ff_sru_units=32)
    return c
