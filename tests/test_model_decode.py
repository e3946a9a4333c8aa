"""The dense baseline: KV-cache decoding equals the full causal forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling_sparse.config import load_config
from scaling_sparse.decode import generate
from scaling_sparse.model import DecoderLM


@pytest.fixture(scope="module")
def model():
    return DecoderLM(load_config("tiny").model, rngs=nnx.Rngs(0))


def test_token_by_token_decode_equals_full_forward(model):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, model.vocab_size)
    full = model(tokens)
    cache = model.init_cache(2, 16)
    steps = []
    for i in range(tokens.shape[1]):
        logits, cache = model.decode(tokens[:, i:i + 1], cache, i)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_prefill_then_steps_equals_full_forward(model):
    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 10), 0, model.vocab_size)
    full = model(tokens)
    cache = model.init_cache(1, 10)
    head, cache = model.decode(tokens[:, :7], cache, 0)
    tail, _ = model.decode(tokens[:, 7:], cache, 7)
    np.testing.assert_allclose(jnp.concatenate([head, tail], 1), full, atol=1e-4, rtol=1e-4)


def test_greedy_generate_matches_argmax_of_forward(model):
    prompt = jax.random.randint(jax.random.PRNGKey(3), (1, 5), 0, model.vocab_size)
    out = np.asarray(generate(model, prompt, 6))
    seq = np.asarray(prompt)
    for t in range(6):  # re-run the full forward pass on the growing sequence
        nxt = int(jnp.argmax(model(jnp.asarray(seq))[0, -1]))
        assert nxt == out[0, t]
        seq = np.concatenate([seq, [[nxt]]], axis=1)


def test_generate_rejects_bad_prompts(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, np.zeros((1, 0), np.int32), 4)
    with pytest.raises(ValueError, match="max_len"):
        generate(model, np.zeros((1, model.max_len), np.int32), 4)


def test_train_mode_is_stochastic_and_needs_rng(model):
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="rng"):
        model(tokens, mode="train")
