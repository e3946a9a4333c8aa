"""The compressed dense model's layer variants (docs/compression.md): factor pairs (SVD / ASVD) and the
per-layer shape of a CoFi-pruned model; decode == forward for both is in test_decode_equals_forward.py
(conftest.VARIANTS "factorised", "pruned")."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from conftest import make_model, random_normal, random_tokens, tiny_config
from scaling_sparse.config import ConfigError, ModelConfig
from scaling_sparse.layers.dense import Dense, LowRankDense
from scaling_sparse.params import report_params


def test_low_rank_dense_is_the_product_of_its_factors():
    layer = LowRankDense(12, 20, 5, rngs=nnx.Rngs(0), axes=("embed", "mlp"))
    x = random_normal(0, (3, 12))
    want = x @ (layer.a[...] @ layer.b[...]) + layer.bias[...]
    np.testing.assert_allclose(layer(x), want, atol=1e-5)
    assert layer.params_per_token() == 5 * (12 + 20) + 20


def test_factor_ranks_replace_every_attention_and_ffn_matrix():
    model = make_model(factor_rank_attn=8, factor_rank_ff=4)
    block = model.stack.blocks[0]
    for layer in (block.attn.qkv.q, block.attn.qkv.k, block.attn.qkv.v, block.attn.out):
        assert isinstance(layer, LowRankDense) and layer.a.shape == (32, 8)
    assert block.ffn.w_in.a.shape == (32, 4) and block.ffn.w_out.b.shape == (4, 32)
    assert isinstance(model.output, nnx.Module) and not hasattr(model.output, "a")  # the output layer stays
    dense, factored = report_params(tiny_config()), report_params(tiny_config(factor_rank_attn=8, factor_rank_ff=4))
    layers = 2
    saved = layers * (4 * (32 * 32 - 8 * 64) + 2 * (32 * 64 - 4 * 96))
    assert dense["params_per_token"] - factored["params_per_token"] == saved


def test_pruned_shape_builds_only_the_kept_sub_layers():
    model = make_model(d_model=24, d_head=8, layer_heads=(3, 0), layer_d_ff=(0, 40))
    first, second = model.stack.blocks
    assert first.ffn is None and first.ffn_norm is None and second.attn is None and second.attn_norm is None
    assert first.attn.qkv.q.kernel.shape == (24, 24) and first.attn.out.kernel.shape == (24, 24)
    assert second.ffn.w_in.kernel.shape == (24, 40)
    paths = {"/".join(map(str, k)) for k in traverse_util.flatten_dict(nnx.state(model, nnx.Param).to_pure_dict())}
    assert not any(p.startswith(("stack/blocks/0/ffn", "stack/blocks/1/attn")) for p in paths)
    # A block without a sub-layer adds nothing for it: the model still runs and is causal.
    tokens = random_tokens(0, (1, 6), vocab=64)
    full = model(tokens)
    changed = model(tokens.at[0, 4].set((tokens[0, 4] + 1) % 64))
    np.testing.assert_allclose(full[:, :4], changed[:, :4], atol=1e-6)


def test_a_saved_config_without_the_fields_keeps_the_plain_model():
    fields = tiny_config().model.to_dict()
    for name in ("factor_rank_attn", "factor_rank_ff", "d_head", "layer_heads", "layer_d_ff"):
        fields.pop(name)
    m = ModelConfig.from_config(fields)
    assert m.layer_heads == () and m.heads_of(1) == 4 and m.d_ff_of(0) == 64 and m.head_dim == 8
    assert ModelConfig.from_config({**fields, "layer_heads": [4, 2]}).layer_heads == (4, 2)  # JSON lists


@pytest.mark.parametrize("fields, named", [
    (dict(factor_rank_attn=8, ff_sparsity=8), "model.ff_sparsity"),
    (dict(layer_heads=(4,)), "model.layer_heads"),
    (dict(layer_d_ff=(64, -1)), "model.layer_d_ff"),
    (dict(factor_rank_ff=33), "model.factor_rank_ff"),
    (dict(d_head=8, layer_heads=(2, 2), reversible=True), "model.reversible"),
    (dict(factor_rank_attn=-1), "model.factor_rank_attn"),
])
def test_bad_compressed_fields_name_the_field_and_the_fix(fields, named):
    with pytest.raises(ConfigError, match=named) as error:
        tiny_config(**fields)
    assert "Fix:" in str(error.value)


def test_plain_dense_layers_are_unchanged():
    block = make_model().stack.blocks[0]
    assert isinstance(block.attn.qkv.q, Dense) and block.attn.qkv.q.kernel.shape == (32, 32)
    assert jnp.asarray(block.ffn.w_in.kernel).shape == (32, 64)
