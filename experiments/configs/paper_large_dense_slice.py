"""The paper's 17B dense decode-timing row as the reference instantiates it (docs/semantics.md §5): trax
`decoding_timing_test.py`'s `big_transformer` template, a slice of the encoder-decoder of 1 encoder + 2
decoder blocks at the 17B width: d 9216, 96 heads, d_ff 40960, vocab 32000, dense self-attention,
dense cross-attention in each decoder block, a dense loss layer (loss sparsity 0). For the decode
benchmark (`benchmarks/decode_latency.py --paper_rows`); its weights are ~3.6B parameters (14 GB in
float32; `python -m scaling_sparse params --config=experiments/configs/paper_large_dense_slice.py`)."""

from scaling_sparse.config import load_config


def get_config():
    c = load_config("paper_medium_dense")
    c.model.update(n_encoder_layers=1, n_layers=2, d_model=9216, n_heads=96, d_ff=40960, vocab_size=32000,
                   loss_sparsity=0)
    return c
