"""The paper's ~800M dense C4 model as the reference trains it (docs/semantics.md §5): a T5-style
encoder-decoder (trax `ConfigurableTransformer`), 24 encoder + 24 decoder blocks, d 1024, 16 heads,
d_ff 4096, T5's 32000-piece vocabulary, C4 with span corruption (noise density 0.15, mean span 3),
inputs 512 / targets 256 tokens, batch 32, Adafactor with 1/sqrt(max(step, 10000)), dropout 0.1."""

from scaling_sparse.config import base_config


def get_config():
    c = base_config()
    c.model.update(arch="encdec", n_encoder_layers=24, n_layers=24, vocab_size=32000, d_model=1024, d_ff=4096,
                   n_heads=16, max_len=512, dropout=0.1, attn_dropout=0.1)
    c.train.update(num_steps=524288, batch_size=32, inputs_len=512, seq_len=256, warmup_steps=10000,
                   learning_rate=1.0, eval_every=5000, checkpoint_every=5000, log_every=100, eval_batches=32)
    c.data.update(source="tfds", tfds_name="c4/en:3.1.0", objective="span_corruption", noise_density=0.15,
                  mean_noise_span_length=3.0)
    return c
