"""A tiny Terraformer for tests: every Terraformer option on (reversible, LSH over several chunks,
SRU) plus sparse FFN, QKV and loss; compiles in seconds on 2 CPU cores."""

from experiments.configs.tiny import get_config as tiny_config


def get_config():
    c = tiny_config()
    c.model.update(reversible=True, attention="lsh", lsh_chunk_len=8, lsh_n_hashes=2, ff_sru_units=8,
                   ff_sparsity=8, attn_sparsity=4, loss_sparsity=4, n_layers=1)
    return c
