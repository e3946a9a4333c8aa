"""Every layer and model variant at the tiny preset: what the tests parametrise over (decode equals
eval, logical axes, kernels, ...) and what benchmarks/accelerator_check.py runs on a GPU. Each entry
is a set of config.model overrides of experiments/configs/tiny.py (vocab 64, d_model 32, d_ff 64,
4 heads, 2 layers, max_len 64)."""

SPARSE_ALL = dict(ff_sparsity=8, attn_sparsity=4, loss_sparsity=4)
# LSH decodes with full attention over the cache (layers/lsh.py), which equals the forward pass when
# the sequence fits one LSH chunk: chunk 64 = max_len. Several chunks are covered in tests/test_lsh.py.
LSH_ONE_CHUNK = dict(attention="lsh", lsh_chunk_len=64, lsh_n_hashes=2)

# Decoder-only LMs (model.arch = "decoder"): name -> model-field overrides.
VARIANTS = {
    "dense": {},
    "sparse_ff": dict(ff_sparsity=8),
    "sparse_qkv": dict(attn_sparsity=4, attn_output="none"),
    "sparse_qkv_out_dense": dict(attn_sparsity=4, attn_output="dense"),
    "sparse_qkv_out_mult": dict(attn_sparsity=4, attn_output="mult"),
    "loss_mult": dict(loss_sparsity=4, loss_type="mult"),
    "loss_lowrank": dict(loss_type="lowrank", loss_lowrank=8),
    "sparse_all": SPARSE_ALL,
    "sru": dict(ff_sru_units=8),
    "reversible": dict(reversible=True),
    "reversible_sparse_all": dict(reversible=True, **SPARSE_ALL),
    "lsh_one_chunk": LSH_ONE_CHUNK,
    "terraformer_one_chunk": dict(reversible=True, ff_sru_units=8, **LSH_ONE_CHUNK, **SPARSE_ALL),
    # Compressed dense models (docs/compression.md): SVD / ASVD factor pairs, and a CoFi-pruned shape
    # (narrower hidden dimension, heads of the original width, layer 0 without FFN, layer 1 without attention).
    "factorised": dict(factor_rank_attn=8, factor_rank_ff=8),
    "pruned": dict(d_model=24, d_head=8, layer_heads=(3, 0), layer_d_ff=(0, 40)),
}

# Encoder-decoders (model.arch = "encdec", one encoder layer, span-corruption data): name -> overrides.
ENCDEC_VARIANTS = {
    "dense": {},
    "sparse_all": SPARSE_ALL,
    "sparse_ff_sru": dict(ff_sparsity=8, ff_sru_units=8),
    # The reference's C4 Terraformer: reversible encoder, streams concatenated with the decoder's.
    "terraformer": dict(reversible=True, ff_sru_units=8, **SPARSE_ALL),
    "terraformer_lsh_one_chunk": dict(reversible=True, attention="lsh", lsh_chunk_len=64, **SPARSE_ALL),
}
ENCDEC_FIELDS = dict(arch="encdec", n_encoder_layers=1)


def tiny_config(**model_fields):
    """The tiny preset with `model_fields` overridden, validated (raises ConfigError naming a field)."""
    from scaling_sparse.config import load_config, validate

    c = load_config("tiny")
    c.model.update(**model_fields)
    return validate(c)


def tiny_encdec_config(**model_fields):
    """The tiny preset as an encoder-decoder (ENCDEC_FIELDS, span corruption, 32 input tokens)."""
    from scaling_sparse.config import load_config, validate

    c = load_config("tiny")
    c.model.update(**ENCDEC_FIELDS, **model_fields)
    c.data.objective = "span_corruption"
    c.train.inputs_len = 32
    return validate(c)
