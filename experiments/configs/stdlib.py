"""The demo: a small dense LM on the Python standard library sources (no download).

Two initialisers differ from the reference's (options, docs/semantics.md §5b), because this demo trains
for 300 steps only: token embeddings start N(0, 1) (`model.embed_init="normal"`) instead of uniform
with std 1/sqrt(d), which under Adafactor's parameter-scaled updates learns its embeddings slowly
(validation loss 6.13 at step 100 against 5.54); dense Q, K, V start with the limits of one fused
[d, 3d] Glorot matrix (`model.qkv_init="fused"`) instead of three [d, d] ones (4.59 against 5.37 at
step 200); sparse-QKV convolution kernels (stdlib_sparse) start Glorot-uniform over their whole
receptive field (`model.conv_init="receptive_field"`) instead of std 1/sqrt(M) (stdlib_sparse: 4.76
against 6.28 at step 100). The paper presets (medium_*, large_*, paper_*) keep the reference's."""

from scaling_sparse.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=4096, d_model=256, d_ff=1024, n_heads=4, n_layers=4, max_len=256,
                   embed_init="normal", qkv_init="fused", conv_init="receptive_field")
    c.train.update(num_steps=300, batch_size=16, seq_len=128, warmup_steps=100, learning_rate=1.0,
                   log_every=10, eval_every=100, eval_batches=8, checkpoint_every=100)
    c.data.update(source="stdlib", tokenizer_train_chars=3_000_000)
    # Sampled, as Hugging Face's `generate(do_sample=True)` users expect: greedy decoding of a model this
    # small after 300 steps falls into a loop (the same import line again and again). --temperature=0
    # gives greedy back.
    c.generate.update(temperature=0.7, top_k=40, seed=0)
    return c
