"""The paper's ~800M dense baseline (reference.md §5): d 1024, 16 heads, 24 layers, d_ff 4096,
vocab 32000 (T5's SentencePiece vocabulary), trained on C4 from TFDS."""

from scaling_sparse.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=32000, d_model=1024, d_ff=4096, n_heads=16, n_layers=24, max_len=1024,
                   dropout=0.1, attn_dropout=0.1)
    c.train.update(num_steps=524288, batch_size=32, seq_len=1024, warmup_steps=10000, learning_rate=1.0,
                   eval_every=5000, checkpoint_every=5000, log_every=100, eval_batches=32)
    c.data.update(source="tfds", tfds_name="c4/en:3.1.0")
    return c
