"""SparseFF (docs/semantics.md §1): decode == eval, training masks, straight-through gradients, counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_normal
from scaling_sparse.layers.sparse_ffn import SparseFF

D, F, N = 32, 128, 8  # B = 16 blocks, default rank 16


def make(**kw):
    return SparseFF(D, F, N, rngs=nnx.Rngs(0), **kw)


def x_of(seed=1, shape=(3, 40)):
    return random_normal(seed, (*shape, D))


def test_decode_gather_equals_dense_eval_on_many_tokens():
    ff = make()
    x = x_of(shape=(8, 40))  # 320 tokens
    dense = ff(x, mode="eval")
    gathered, cache = ff.decode(x, {}, 0)
    assert cache == {}
    np.testing.assert_allclose(gathered, dense, atol=1e-5, rtol=1e-5)
    # The choices differ across tokens, so the test exercises many different rows.
    assert len(np.unique(np.asarray(ff.choose(x)).reshape(-1, F // N), axis=0)) > 100


def test_decode_one_token_jitted_equals_eval():
    ff = make()
    graphdef, state = nnx.split(ff)
    step = jax.jit(lambda s, x: nnx.merge(graphdef, s).decode(x, {}, 0)[0])
    x = x_of(2, (1, 3))
    for t in range(3):
        np.testing.assert_allclose(step(state, x[:, t:t + 1]), ff(x[:, t:t + 1]), atol=1e-5, rtol=1e-5)


def test_decode_reads_rows_without_transposes():
    """The decode program gathers rows of the [B, N, d] weights and never transposes or copies them."""
    graphdef, state = nnx.split(make())
    hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s).decode(x, {}, 0)[0]).lower(
        state, jnp.zeros((1, 1, D))).compile().as_text()
    assert "gather" in hlo
    assert "transpose(" not in hlo and "copy(" not in hlo


def test_eval_mask_is_one_hot_argmax_of_controller():
    ff = make()
    x = x_of()
    mask = ff.mask(x, "eval")
    assert mask.shape == (3, 40, F // N, N)
    np.testing.assert_array_equal(mask.sum(-1), 1.0)
    np.testing.assert_array_equal(mask.argmax(-1), ff.controller_logits(x).argmax(-1))


def test_controller_logits_match_the_formula():
    ff = make()
    x = x_of()
    want = jnp.einsum("...i,il,lbn->...bn", x, ff.c1[...], ff.c2[...]) + ff.cb[...]
    np.testing.assert_allclose(ff.controller_logits(x), want, atol=1e-5, rtol=1e-5)


def test_same_key_gives_bit_identical_masks_and_outputs():
    ff = make(quant_prob=0.5, dropout_rate=0.3)
    x = x_of()
    key = jax.random.PRNGKey(7)
    np.testing.assert_array_equal(ff.mask(x, "train", key), ff.mask(x, "train", key))
    np.testing.assert_array_equal(ff(x, mode="train", rng=key), ff(x, mode="train", rng=key))
    hard = make(quant_prob=1.0)  # a different key draws different Gumbel noise
    assert not np.array_equal(hard.mask(x, "train", key), hard.mask(x, "train", jax.random.PRNGKey(8)))


def test_hard_training_step_has_one_hot_blocks():
    ff = make(quant_prob=1.0)
    mask = np.asarray(ff.mask(x_of(), "train", jax.random.PRNGKey(3)))
    # onehot + p - stop_gradient(p): equal to a one-hot up to rounding.
    np.testing.assert_allclose(mask, np.round(mask), atol=1e-6)
    np.testing.assert_array_equal(np.round(mask).sum(-1), 1.0)


def test_gumbel_noise_changes_choices_and_zero_temperature_is_argmax():
    x = x_of()
    noisy = make(quant_prob=1.0, temperature=1.0).mask(x, "train", jax.random.PRNGKey(3))
    argmax = make().mask(x, "eval")
    assert 0.0 < float((noisy.argmax(-1) != argmax.argmax(-1)).mean()) < 1.0
    cold = make(quant_prob=1.0, temperature=0.0).mask(x, "train", jax.random.PRNGKey(3))
    np.testing.assert_array_equal(cold.argmax(-1), argmax.argmax(-1))


def test_soft_training_step_uses_softmax_of_controller():
    ff = make(quant_prob=0.0)
    x = x_of()
    mask = ff.mask(x, "train", jax.random.PRNGKey(3))
    np.testing.assert_allclose(mask, jax.nn.softmax(ff.controller_logits(x), -1), atol=1e-6)
    assert float(mask.max()) < 0.999  # genuinely soft


def test_quant_prob_is_one_draw_per_call():
    ff = make(quant_prob=0.3)
    x = x_of(shape=(1, 4))
    keys = jax.random.split(jax.random.PRNGKey(0), 500)
    graphdef, state = nnx.split(ff)
    masks = jax.jit(jax.vmap(lambda k: nnx.merge(graphdef, state).mask(x, "train", k)))(keys)
    hard = np.asarray(jnp.all(jnp.abs(masks - jnp.round(masks)) < 1e-6, axis=(1, 2, 3, 4)))
    soft = np.asarray(jnp.all(jnp.abs(masks - jnp.round(masks)) > 1e-6, axis=(1, 2, 3, 4)))
    assert np.all(hard | soft)  # never a mix within one call
    assert 0.24 < hard.mean() < 0.36


def test_train_with_hard_argmax_mask_equals_eval():
    ff = make(quant_prob=1.0, temperature=0.0)
    x = x_of()
    np.testing.assert_allclose(ff(x, mode="train", rng=jax.random.PRNGKey(0)), ff(x), atol=1e-6)


@pytest.mark.parametrize("quant_prob", [1.0, 0.0], ids=["hard", "soft"])
def test_gradients_reach_the_controller(quant_prob):
    ff = make(quant_prob=quant_prob)
    x = x_of()
    graphdef, params = nnx.split(ff, nnx.Param)

    def loss(p):
        return jnp.sum(jnp.square(nnx.merge(graphdef, p)(x, mode="train", rng=jax.random.PRNGKey(5))))

    grads = jax.grad(loss)(params)
    for name in ("c1", "c2", "cb", "w1", "w2", "b2"):
        g = np.asarray(grads[name][...])
        assert np.all(np.isfinite(g)), name
        assert np.abs(g).max() > 0, name


def test_dropout_applies_in_train_mode_only():
    ff = make(quant_prob=1.0, temperature=0.0, dropout_rate=0.5)
    x = x_of()
    train = ff(x, mode="train", rng=jax.random.PRNGKey(0))
    assert not np.allclose(train, ff(x), atol=1e-4)
    np.testing.assert_array_equal(ff(x), ff(x, mode="eval"))


def test_train_mode_needs_a_key_and_modes_are_checked():
    ff = make()
    with pytest.raises(ValueError, match="rng"):
        ff(x_of(), mode="train")
    with pytest.raises(ValueError, match="mode"):
        ff(x_of(), mode="predict")


def test_parameter_counts_are_closed_form():
    r = 4
    ff = SparseFF(D, F, N, lowrank=r, rngs=nnx.Rngs(0))
    b = F // N
    assert ff.w1.shape == ff.w2.shape == (b, N, D)  # the unit axis leads in both matrices
    total = sum(p.size for p in jax.tree.leaves(nnx.state(ff, nnx.Param)))
    assert total == 2 * D * F + D + D * r + r * F + F
    assert ff.params_per_token() == D * r + r * F + F + 2 * b * D + D
    assert make().lowrank == F // N  # the reference's default rank


def test_initialisation_scales():
    ff = make()
    limit = np.sqrt(6.0 / (D + F))  # Glorot-uniform over the logical [d, f] matrix
    for w in (ff.w1, ff.w2):
        a = np.asarray(w[...])
        assert np.abs(a).max() <= limit and np.abs(a).max() > 0.95 * limit
    assert np.abs(np.asarray(ff.cb[...])).max() < 1e-5 and np.abs(np.asarray(ff.b2[...])).max() < 1e-5


def test_bad_sizes_fail_naming_the_field():
    with pytest.raises(ValueError, match="ff_sparsity"):
        SparseFF(D, 100, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ff_lowrank"):
        SparseFF(D, F, N, lowrank=D + 1, rngs=nnx.Rngs(0))
