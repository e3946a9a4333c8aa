"""The reference's C4 medium Terraformer (reference.md §4), decoder-only: d 1024, 16 heads, sparse FFN
(N 64, d_ff 6144), sparse QKV (S 16), multiplicative loss layer (4 modules), SRU recurrence (32 units)
in the FFN, LSH self-attention (chunks of 128) and a reversible stack (two attention half-residuals and
one FFN half-residual per block). 24 blocks keep the total near medium_sparse_all's (the second
attention per block is small: sparse QKV without an output projection)."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("medium_sparse_all")
    c.model.update(reversible=True, attention="lsh", lsh_chunk_len=128, lsh_n_hashes=1, ff_sru_units=32,
                   n_layers=24)
    return c
