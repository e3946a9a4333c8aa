"""Terraformer pieces in the whole decoder: the SRU's linear recurrence and decode state match the full
pass; tiny_terraformer trains. (Decoding equals the forward pass for every Terraformer option:
test_decode_equals_forward.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import random_tokens
from scaling_sparse.config import load_config
from scaling_sparse.layers.sru import SRU, linear_recurrence
from scaling_sparse.models import DecoderLM


def test_linear_recurrence_equals_a_python_loop():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, (2, 9, 3)), rng.normal(size=(2, 9, 3))
    c0 = rng.normal(size=(2, 3))
    expected, c = [], c0
    for t in range(9):
        c = a[:, t] * c + b[:, t]
        expected.append(c)
    np.testing.assert_allclose(linear_recurrence(jnp.asarray(a), jnp.asarray(b), jnp.asarray(c0)),
                               np.stack(expected, 1), rtol=1e-5, atol=1e-5)


def test_sru_decode_state_matches_the_full_pass():
    sru = SRU(6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 6))
    full = sru(x)
    state = sru.init_cache(2, 10, jnp.float32)
    outs = []
    for t in range(10):
        h, state = sru.decode(x[:, t:t + 1], state, t)
        outs.append(h)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
    # The state after the steps is the full pass's last cell state.
    _, last = sru.decode(x, sru.init_cache(2, 10, jnp.float32), 0)
    np.testing.assert_allclose(state, last, atol=1e-5, rtol=1e-5)


def test_tiny_terraformer_trains():
    model = DecoderLM(load_config("tiny_terraformer").model, rngs=nnx.Rngs(0))
    tokens = random_tokens(2, (2, 33))
    import optax

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, key):
        def loss(m):
            logits = m(tokens[:, :-1], mode="train", rng=key)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    losses = [float(train_step(model, optimizer, jax.random.PRNGKey(i))) for i in range(30)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
