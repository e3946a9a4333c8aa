"""Reversible stack: custom-VJP gradients equal plain autodiff of the same network (dense and sparse
layers); the sparse FFN picks identical masks in the forward pass and the recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SPARSE_ALL as SPARSE
from conftest import make_model
from scaling_sparse.layers.reversible import ReversibleStack
from scaling_sparse.layers.sparse_ffn import SparseFF


def _model(**overrides):
    return make_model(**{"reversible": True, "dropout": 0.1, "attn_dropout": 0.1, **overrides})


def _grads(model, tokens, mode, recompute):
    model.stack.recompute = recompute

    def loss(m):
        logits = m(tokens, mode=mode, rng=jax.random.PRNGKey(7))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    model.stack.recompute = True
    return value, grads


@pytest.mark.parametrize("layers,mode", [("dense", "train"), ("dense", "eval"), ("sparse", "train")])
def test_recomputed_gradients_equal_plain_autodiff(layers, mode):
    model = _model(**(SPARSE if layers == "sparse" else {}))
    assert isinstance(model.stack, ReversibleStack)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 1, model.vocab_size)
    v1, g1 = _grads(model, tokens, mode, recompute=True)
    v2, g2 = _grads(model, tokens, mode, recompute=False)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    assert len(flat1) == len(flat2) > 0
    for a, b in zip(flat1, flat2):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    # The block parameters get real gradients (not zeros from a detached recomputation).
    assert float(jnp.abs(g1["stack"]["blocks"][0]["ffn_norm"]["scale"][...]).sum()) > 0


def test_sparse_ffn_masks_identical_in_forward_and_recomputation(monkeypatch):
    records = []  # (key bytes, mask) for every SparseFF.mask call, forward and backward
    original = SparseFF.mask

    def recording_mask(self, x, mode="eval", rng=None, choice=None):
        mask = original(self, x, mode, rng, choice)
        jax.debug.callback(lambda k, m: records.append((np.asarray(k).tobytes(), np.asarray(m))), rng, mask)
        return mask

    monkeypatch.setattr(SparseFF, "mask", recording_mask)
    model = _model(n_layers=3, ff_quant_prob=0.5, **SPARSE)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 1, model.vocab_size)
    grad = nnx.jit(nnx.grad(lambda m, key: jnp.mean(m(tokens, mode="train", rng=key))))
    hard_seen = soft_seen = False
    for step in range(3):  # several keys: both the hard and the soft draws occur
        records.clear()
        jax.block_until_ready(grad(model, jax.random.PRNGKey(step)))
        jax.effects_barrier()
        by_key = {}
        for key, mask in records:
            by_key.setdefault(key, []).append(mask)
        assert len(by_key) == 3, "one key per layer's FFN"
        for forward, recomputed in by_key.values():
            assert forward.shape == recomputed.shape == (2, 8, 8, 8)
            np.testing.assert_array_equal(forward.argmax(-1), recomputed.argmax(-1))  # same units chosen
            np.testing.assert_allclose(forward, recomputed, atol=1e-5)  # and the same hard/soft draw
            hard = bool(forward.max(-1).min() > 0.999)  # one-hot (straight-through) vs soft softmax
            hard_seen, soft_seen = hard_seen or hard, soft_seen or not hard
    assert hard_seen and soft_seen, "a draw kind did not occur: the test would not cover it"


def test_components_count_both_attentions_and_the_ffn():
    model = _model()
    report = model.components()
    attn = sum(nnx.state(b.attn1, nnx.Param).flat_state().__len__() > 0 for b in model.stack.blocks)
    assert attn == len(model.stack.blocks)
    block = model.stack.blocks[0]
    count = lambda mod: sum(x.size for x in jax.tree.leaves(nnx.state(mod, nnx.Param)))  # noqa: E731
    n = len(model.stack.blocks)
    assert report["attention"]["total"] == n * (count(block.attn1) + count(block.attn2))
    assert report["ffn"]["total"] == n * count(block.ffn)


def test_train_mode_needs_rng():
    model = _model()
    with pytest.raises(ValueError, match="rng"):
        model.stack(jnp.zeros((1, 4, 32)), mode="train")
