"""The whole decoder with every sparsity flag on (tiny sizes): every sparse layer is used, the jitted
forward pass equals the eager one, training reaches the controller, invalid combinations fail at
start-up naming the field. (Decoding equals the forward pass: test_decode_equals_forward.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import SPARSE_ALL, make_model, random_tokens, tiny_config
from scaling_sparse.config import ConfigError


def sparse_config(**fields):
    return tiny_config(**{**SPARSE_ALL, **fields})


@pytest.fixture(scope="module")
def model():
    return make_model(**SPARSE_ALL)


def test_every_sparse_layer_is_used(model):
    from scaling_sparse.layers.sparse_ffn import SparseFF
    from scaling_sparse.layers.sparse_output import MultiplicativeOutput
    from scaling_sparse.layers.sparse_qkv import SparseQKV

    block = model.stack.blocks[0]
    assert isinstance(block.ffn, SparseFF) and isinstance(block.attn.qkv, SparseQKV)
    assert block.attn.out is None and isinstance(model.output, MultiplicativeOutput)


def test_jitted_forward_equals_eager(model):
    tokens = random_tokens(1, (2, 12))
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    np.testing.assert_allclose(model(tokens), jitted, atol=1e-5, rtol=1e-5)


def test_training_gradients_reach_every_controller(model):
    # A hard step (the straight-through path); test_sparse_ffn.py checks soft steps layer by layer.
    # The fixture's weights with quant_prob 1 (a static attribute, captured by split) saves a fresh init.
    for block in model.stack.blocks:
        block.ffn.quant_prob = 1.0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    for block in model.stack.blocks:
        block.ffn.quant_prob = 0.3
    tokens = random_tokens(4, (2, 9))

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(tokens[:, :-1], mode="train", rng=jax.random.PRNGKey(0))
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    value, grads = value_and_grad(params)
    assert np.isfinite(float(value))
    # The same key replays the same masks and dropout: bit-identical (the reversible stack relies on it).
    again, grads_again = value_and_grad(params)
    assert float(value) == float(again)
    jax.tree.map(np.testing.assert_array_equal, grads, grads_again)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    for block in grads["stack"]["blocks"].values():
        for name in ("c1", "c2", "cb"):
            assert float(jnp.abs(block["ffn"][name][...]).max()) > 0, name


@pytest.mark.parametrize("fields,field", [
    ({"d_ff": 60}, "model.ff_sparsity"),                      # d_ff not divisible by N
    ({"ff_lowrank": 33}, "model.ff_lowrank"),                 # rank > d_model
    ({"attn_sparsity": 5}, "model.attn_sparsity"),            # d_model not divisible by S
    ({"vocab_size": 66}, "model.loss_sparsity"),              # vocab not divisible by loss sparsity
    ({"loss_type": "lowrank", "loss_lowrank": 40}, "model.loss_lowrank"),  # rank > d_model
    ({"loss_type": "lowrank"}, "model.loss_lowrank"),         # low-rank loss without a rank
    ({"attn_output": "conv"}, "model.attn_output"),
])
def test_invalid_combinations_fail_at_start_up_naming_the_field(fields, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        sparse_config(**fields)
