"""The paper's 17B dense row at full depth (issue 31; the paper's widths, docs/semantics.md): large_dense's widths (d 9216, 96 heads,
d_ff 40960, vocab 32000, dense loss layer as the reference's timing test) with 15 decoder blocks: 17.02B
parameters (`python -m scaling_sparse params --config=experiments/configs/paper_17b_dense.py`). It fits a 24 GB
machine only with int8 weights (benchmarks/decode_17b.py builds it so, docs/quantization.md)."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("large_dense")
    c.model.update(n_layers=15)
    return c
