"""The paper's 17B sparse row at full depth (issue 31; the paper's widths, docs/semantics.md): large_sparse's widths (sparse FFN N 256,
controller rank 32, d_ff 65536; sparse QKV S 64; multiplicative loss layer with 4 modules) with 14 decoder
blocks: 17.36B parameters. Decoded with int8 weights by benchmarks/decode_17b.py."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("large_sparse")
    c.model.update(n_layers=14)
    return c
