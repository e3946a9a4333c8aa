"""Every Terraformer option in the whole decoder: decoding token by token (and prefill + steps) equals
the full causal forward pass; the SRU's decode state matches the full pass; tiny_terraformer trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling_sparse.config import load_config, validate
from scaling_sparse.layers.sru import SRU, linear_recurrence
from scaling_sparse.model import DecoderLM

SPARSE = dict(ff_sparsity=8, attn_sparsity=4, loss_sparsity=4)
# LSH decodes with full attention over the cache (lsh.py), which equals the forward pass when the
# sequence is one LSH chunk; the several-chunk forward pass is covered in test_lsh.py.
OPTIONS = {
    "reversible": dict(reversible=True),
    "sru": dict(ff_sru_units=8),
    "lsh": dict(attention="lsh", lsh_chunk_len=16, lsh_n_hashes=2),
    "reversible_sparse": dict(reversible=True, **SPARSE),
    "all": dict(reversible=True, ff_sru_units=8, attention="lsh", lsh_chunk_len=16, lsh_n_hashes=2, **SPARSE),
}
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)


def _model(**fields):
    c = load_config("tiny")
    c.model.update(**fields)
    return DecoderLM(validate(c).model, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_decode_equals_eval(option):
    model = _model(**OPTIONS[option])
    full = nnx.jit(lambda m, t: m(t, mode="eval"))(model, TOKENS)
    step = nnx.jit(lambda m, t, c, i: m.decode(t, c, i))
    cache = model.init_cache(2, 16)
    steps = []
    for i in range(TOKENS.shape[1]):
        logits, cache = step(model, TOKENS[:, i:i + 1], cache, jnp.int32(i))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4, rtol=1e-4)
    # A prefill of 5 tokens then single steps gives the same logits too.
    cache = model.init_cache(2, 16)
    head, cache = step(model, TOKENS[:, :5], cache, jnp.int32(0))
    rest = []
    for i in range(5, TOKENS.shape[1]):
        logits, cache = step(model, TOKENS[:, i:i + 1], cache, jnp.int32(i))
        rest.append(logits)
    np.testing.assert_allclose(jnp.concatenate([head, *rest], 1), full, atol=1e-4, rtol=1e-4)


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
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 33)), jnp.int32)
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
