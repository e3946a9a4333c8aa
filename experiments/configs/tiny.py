"""A tiny model for tests: compiles and runs in seconds on 2 CPU cores."""

from scaling_sparse.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=64, d_model=32, d_ff=64, n_heads=4, n_layers=2, max_len=64)
    c.train.update(num_steps=20, batch_size=4, seq_len=32, inputs_len=64, warmup_steps=10, log_every=5, eval_every=10,
                   eval_batches=2, checkpoint_every=10, learning_rate=0.5, progress=False)
    c.data.update(tokenizer_train_chars=200_000, max_files=40)
    return c
