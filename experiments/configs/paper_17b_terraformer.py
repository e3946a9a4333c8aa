"""The paper's 17B Terraformer row at full depth (issue 31; docs/semantics.md §4): the sparse 17B model with the
reversible stack (two attention half-residuals and one FFN half-residual per block) and the SRU recurrence
(32 units) in the FFN, decoder-only, full attention (decoding attends over a short cache; LSH matters for long
inputs), 14 blocks: 17.40B parameters. Decoded with int8 weights by benchmarks/decode_17b.py."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("paper_17b_sparse")
    c.model.update(reversible=True, ff_sru_units=32)
    return c
