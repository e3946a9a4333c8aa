"""The paper's 17B-row dense width (reference.md §5): d 9216, 96 heads, d_ff 40960, vocab 32000.

Only a slice of the layers by default (n_layers = 2): the full model does not fit in this machine's memory,
and the reference's decode benchmark also instantiated only a slice. Per-layer figures scale to the full
depth; set --config.model.n_layers=N for more (parameter reports never allocate, so any N is fine there).
"""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("medium_dense")
    c.model.update(d_model=9216, n_heads=96, d_ff=40960, vocab_size=32000, n_layers=2)
    return c
