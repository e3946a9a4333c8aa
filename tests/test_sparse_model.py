"""The whole decoder with every sparsity flag on (tiny sizes): decoding equals the forward pass,
training reaches the controller, invalid combinations fail at start-up naming the field."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from scaling_sparse.config import ConfigError, load_config, validate
from scaling_sparse.decode import generate
from scaling_sparse.model import DecoderLM


def sparse_config(**fields):
    c = load_config("tiny")
    c.model.update(**{"ff_sparsity": 8, "attn_sparsity": 4, "loss_sparsity": 4, **fields})
    return validate(c)


@pytest.fixture(scope="module")
def model():
    return DecoderLM(sparse_config().model, rngs=nnx.Rngs(0))


def tokens_of(seed, shape, vocab=64):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def test_every_sparse_layer_is_used(model):
    from scaling_sparse.layers.sparse_ffn import SparseFF
    from scaling_sparse.layers.sparse_output import MultiplicativeOutput
    from scaling_sparse.layers.sparse_qkv import SparseQKV

    block = model.stack.blocks[0]
    assert isinstance(block.ffn, SparseFF) and isinstance(block.attn.qkv, SparseQKV)
    assert block.attn.out is None and isinstance(model.output, MultiplicativeOutput)


@pytest.fixture(scope="module")
def jitted(model):
    """Jitted forward and decode: one compile per shape instead of op-by-op dispatch (slow on 2 cores)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    decode = jax.jit(lambda s, t, c, i: nnx.merge(graphdef, s).decode(t, c, i))
    return (lambda t: forward(state, t)), (lambda t, c, i: decode(state, t, c, i))


TOKENS = tokens_of(1, (2, 12))


def test_token_by_token_decode_equals_full_forward(model, jitted):
    forward, decode = jitted
    full = forward(TOKENS)
    cache = model.init_cache(2, 16)
    steps = []
    for i in range(TOKENS.shape[1]):
        logits, cache = decode(TOKENS[:, i:i + 1], cache, i)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4, rtol=1e-4)
    # ... and equals the eager forward pass too.
    np.testing.assert_allclose(model(TOKENS), full, atol=1e-5, rtol=1e-5)


def test_prefill_then_steps_equals_full_forward(model, jitted):
    # (The optional attention output projections are covered in test_sparse_qkv.py.)
    forward, decode = jitted
    cache = model.init_cache(2, 16)
    head, cache = decode(TOKENS[:, :7], cache, 0)
    tail, _ = decode(TOKENS[:, 7:], cache, 7)
    np.testing.assert_allclose(jnp.concatenate([head, tail], 1), forward(TOKENS), atol=1e-4, rtol=1e-4)


def test_jitted_greedy_generate_matches_argmax_of_forward(model, jitted):
    forward, _ = jitted
    prompt = TOKENS[:, :7]
    out = generate(model, prompt, 5)
    # Causal model: one forward pass over prompt + output gives every greedy choice at once.
    logits = forward(jnp.concatenate([prompt, out], axis=1))
    np.testing.assert_array_equal(jnp.argmax(logits[:, 6:-1], -1), out)


def test_training_gradients_reach_every_controller(model):
    # A hard step (the straight-through path); test_sparse_ffn.py checks soft steps layer by layer.
    # The fixture's weights with quant_prob 1 (a static attribute, captured by split) saves a fresh init.
    for block in model.stack.blocks:
        block.ffn.quant_prob = 1.0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    for block in model.stack.blocks:
        block.ffn.quant_prob = 0.3
    tokens = tokens_of(4, (2, 9))

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
