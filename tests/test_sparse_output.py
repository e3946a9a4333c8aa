"""Sparse output (loss) layers (docs/semantics.md §3): multiplicative with S modules, and low rank."""

import numpy as np
import pytest
from flax import nnx

from conftest import random_normal, tiny_config
from scaling_sparse.layers.factory import make_output
from scaling_sparse.layers.output import DenseOutput
from scaling_sparse.layers.sparse_output import LowRankOutput, MultiplicativeOutput

D, V = 32, 64


def x_of(seed=0):
    return random_normal(seed, (2, 5, D))


@pytest.mark.parametrize("shape", [(2, 5), (1, 1)], ids=["sequence", "one_token"])
def test_multiplicative_output_is_unit_major(shape):
    out = MultiplicativeOutput(D, V, 4, rngs=nnx.Rngs(0))
    x = random_normal(0, (*shape, D))
    logits = np.asarray(out(x))
    assert logits.shape == (*shape, V)
    gates, kernel, bias = (np.asarray(p[...]) for p in (out.gates, out.kernel, out.bias))
    assert gates.shape == (4, D) and kernel.shape == (V // 4, D) and bias.shape == (V,)
    xs = np.asarray(x)
    for s in range(4):  # logit m * S + s is unit m of module s
        want = (xs * gates[s]) @ kernel.T + bias[s::4]
        np.testing.assert_allclose(logits[..., s::4], want, atol=1e-5, rtol=1e-5)


def test_multiplicative_output_counts():
    out = MultiplicativeOutput(D, V, 4, rngs=nnx.Rngs(0))
    assert out.params_per_token() == 4 * D + D * V // 4 + V
    assert out.params_per_token() < DenseOutput(D, V, rngs=nnx.Rngs(0)).params_per_token()


def test_low_rank_output():
    out = LowRankOutput(D, V, 8, rngs=nnx.Rngs(0))
    x = x_of(1)
    want = (np.asarray(x) @ np.asarray(out.down.kernel[...]) + np.asarray(out.down.bias[...])) \
        @ np.asarray(out.up.kernel[...]) + np.asarray(out.up.bias[...])
    np.testing.assert_allclose(out(x), want, atol=1e-5, rtol=1e-5)
    assert out.params_per_token() == D * 8 + 8 + 8 * V + V


def test_bad_sizes_fail_clearly():
    with pytest.raises(ValueError, match="loss_sparsity"):
        MultiplicativeOutput(D, 65, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="loss_lowrank"):
        LowRankOutput(D, V, D + 1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fields,kind", [
    ({}, DenseOutput),
    ({"loss_sparsity": 4}, MultiplicativeOutput),
    ({"loss_type": "lowrank", "loss_lowrank": 8}, LowRankOutput),
    ({"loss_type": "lowrank", "loss_lowrank": 8, "loss_sparsity": 4}, LowRankOutput),
])
def test_the_factory_follows_the_config(fields, kind):
    assert type(make_output(tiny_config(**fields).model, nnx.Rngs(0))) is kind
