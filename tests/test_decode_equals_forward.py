"""Every layer / model variant (conftest.VARIANTS), with float and with int8 weights (quantize.py):
KV-cache decoding equals the full causal eval forward pass, token by token and after a prefill, and
greedy `generate` picks the forward pass's argmax; plus the dense model's decode-time argument and mode
checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import VARIANTS, make_model, random_tokens
from scaling_sparse.decode import generate
from scaling_sparse.quantize import quantize_model

BATCH, LENGTH, CACHE_LEN, PREFILL = 2, 12, 16, 7
TOKENS = random_tokens(1, (BATCH, LENGTH))
TOL = dict(atol=1e-4, rtol=1e-4)


class Jitted:
    """The model split once; eval forward and decode jitted as pure functions of the state. The
    index is a traced int32, so one compile serves every decode step of a given length."""

    def __init__(self, model):
        self.model = model
        graphdef, self.state = nnx.split(model)
        self._forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens, mode="eval"))
        self._decode = jax.jit(lambda state, tokens, cache, index:
                               nnx.merge(graphdef, state).decode(tokens, cache, index))

    def forward(self, tokens):
        return self._forward(self.state, tokens)

    def decode(self, tokens, cache, index):
        return self._decode(self.state, tokens, cache, jnp.asarray(index, jnp.int32))


@pytest.fixture(scope="module", params=["float", "int8"])
def jitted(variant, request):
    name, model = variant
    if request.param == "int8":  # a copy: the variant's model is shared by the module's other tests
        model = quantize_model(make_model(**VARIANTS[name]))
    return Jitted(model)


@pytest.fixture(scope="module")
def full(jitted):
    """The full eval forward pass over TOKENS: logits [BATCH, LENGTH, vocab]."""
    return jitted.forward(TOKENS)


def test_token_by_token_decode_equals_full_forward(jitted, full):
    cache = jitted.model.init_cache(BATCH, CACHE_LEN)
    steps = []
    for i in range(LENGTH):
        logits, cache = jitted.decode(TOKENS[:, i:i + 1], cache, i)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, **TOL)


def test_prefill_then_the_rest_equals_full_forward(jitted, full):
    cache = jitted.model.init_cache(BATCH, CACHE_LEN)
    head, cache = jitted.decode(TOKENS[:, :PREFILL], cache, 0)
    tail, _ = jitted.decode(TOKENS[:, PREFILL:], cache, PREFILL)
    np.testing.assert_allclose(jnp.concatenate([head, tail], 1), full, **TOL)
    # The same prefill cache continued one token at a time (as generate does) gives the same logits.
    steps = []
    for i in range(PREFILL, LENGTH):
        logits, cache = jitted.decode(TOKENS[:, i:i + 1], cache, i)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate([head, *steps], 1), full, **TOL)


def test_greedy_generate_matches_argmax_of_forward(jitted):
    prompt, n = TOKENS[:, :5], 6
    out = np.asarray(generate(jitted.model, prompt, n))
    assert out.shape == (BATCH, n)
    # Re-run the full forward pass on the growing sequence: each greedy choice is the argmax at its
    # last position. The sequence is zero-padded to LENGTH (causal: the padding is never seen), so
    # every pass reuses the forward pass's one compile.
    seq = np.zeros((BATCH, LENGTH), np.int32)
    seq[:, :5] = prompt
    for t in range(n):
        nxt = np.asarray(jnp.argmax(jitted.forward(jnp.asarray(seq))[:, 4 + t], -1))
        np.testing.assert_array_equal(nxt, out[:, t])
        seq[:, 5 + t] = nxt


# The dense model's argument checks (formerly test_model_decode.py).


@pytest.fixture(scope="module")
def dense():
    return make_model()


def test_generate_rejects_bad_prompts(dense):
    with pytest.raises(ValueError, match="empty"):
        generate(dense, np.zeros((1, 0), np.int32), 4)
    with pytest.raises(ValueError, match="max_len"):
        generate(dense, np.zeros((1, dense.max_len), np.int32), 4)


def test_train_mode_needs_rng(dense):
    with pytest.raises(ValueError, match="rng"):
        dense(jnp.zeros((1, 8), jnp.int32), mode="train")
