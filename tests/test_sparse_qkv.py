"""Sparse QKV (docs/semantics.md §2): the multiplicative layer, the module convolution and its decode cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_normal
from scaling_sparse.layers.attention import CausalSelfAttention
from scaling_sparse.layers.multiplicative import ModuleConv, MultiplicativeDense
from scaling_sparse.layers.sparse_qkv import SparseQKV

D, S, H = 32, 4, 4  # M = 8 units per module
M = D // S


@pytest.fixture(scope="module")
def qkv():
    return SparseQKV(D, S, length_kernel=3, rngs=nnx.Rngs(0))


def x_of(seed=1, batch=2, length=12):
    return random_normal(seed, (batch, length, D))


def naive_conv(h, kernel, bias):
    """Direct loops: out[t, s] = sum_{i, j} in[t - (kl-1) + i, s - half + j] @ K[i, j], zeros outside."""
    b, t_len, s_len, _ = h.shape
    kl, ks = kernel.shape[:2]
    half = (ks - 1) // 2
    out = np.zeros((b, t_len, s_len, kernel.shape[3]), np.float64)
    for t in range(t_len):
        for s in range(s_len):
            out[:, t, s] = bias
            for i in range(kl):
                for j in range(ks):
                    tt, ss = t - (kl - 1) + i, s - half + j
                    if 0 <= tt and 0 <= ss < s_len:
                        out[:, t, s] += h[:, tt, ss] @ kernel[i, j]
    return out


def test_multiplicative_layer_matches_its_formula():
    layer = MultiplicativeDense(D, 24, 4, rngs=nnx.Rngs(1))
    x = x_of()
    want = (jnp.einsum("...i,si,im->...sm", x, layer.gates[...], layer.kernel[...]).reshape(2, 12, 24)
            + layer.bias[...])
    np.testing.assert_allclose(layer(x), want, atol=1e-5, rtol=1e-5)
    assert layer.gates.shape == (4, D) and layer.kernel.shape == (D, 6) and layer.bias.shape == (24,)
    assert layer.params_per_token() == 4 * D + D * 6 + 24


def test_multiplicative_layer_can_represent_a_permutation():
    """With one-hot gates and a 0/1 kernel, module s reads the input slice s: any permutation of modules."""
    layer = MultiplicativeDense(D, D, S, rngs=nnx.Rngs(1))
    perm = np.array([2, 0, 3, 1])
    gates = np.zeros((S, D), np.float32)
    for s, src in enumerate(perm):
        gates[s, src * M:(src + 1) * M] = 1.0
    layer.gates[...] = jnp.asarray(gates)
    layer.kernel[...] = jnp.asarray(np.tile(np.eye(M, dtype=np.float32), (S, 1)))
    layer.bias[...] = jnp.zeros(D)
    x = x_of()
    want = x.reshape(2, 12, S, M)[:, :, perm].reshape(2, 12, D)
    np.testing.assert_allclose(layer(x), want, atol=1e-6)


@pytest.mark.parametrize("kernel", [(3, 3), (3, 1), (2, 3)])
def test_module_conv_matches_direct_loops(kernel):
    conv = ModuleConv(S, M, length_kernel=kernel[0], module_kernel=kernel[1], rngs=nnx.Rngs(2))
    h = np.random.default_rng(3).standard_normal((2, 6, S, M)).astype(np.float32)
    padded = jnp.pad(h, ((0, 0), (kernel[0] - 1, 0), (0, 0), (0, 0)))
    want = naive_conv(h, np.asarray(conv.kernel[...]), np.asarray(conv.bias[...]))
    np.testing.assert_allclose(conv(padded), want, atol=1e-5, rtol=1e-5)


def test_qkv_full_pass_matches_multiplicative_then_direct_convs(qkv):
    x = x_of()
    h = np.asarray(qkv.mult(x)).reshape(2, 12, S, M)
    for got, conv in zip(qkv(x), (qkv.conv_q, qkv.conv_k, qkv.conv_v)):
        want = naive_conv(h, np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])).reshape(2, 12, D)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert qkv.conv_q.kernel.shape == qkv.conv_k.kernel.shape == (3, 3, M, M)
    assert qkv.conv_v.kernel.shape == (3, 1, M, M)


def test_qkv_is_causal(qkv):
    x = x_of()
    changed = x.at[:, 7].set(0.0)
    for a, b in zip(qkv(x), qkv(changed)):
        np.testing.assert_array_equal(a[:, :7], b[:, :7])
        assert not np.allclose(a[:, 7:10], b[:, 7:10])


def test_token_by_token_decode_equals_full_pass(qkv):
    x = x_of()
    full = qkv(x)
    cache = qkv.init_cache(2, x.shape[1], jnp.float32)
    steps = []
    for t in range(x.shape[1]):
        out, cache = qkv.decode(x[:, t:t + 1], cache, t)
        steps.append(out)
    for i in range(3):
        np.testing.assert_allclose(jnp.concatenate([s[i] for s in steps], 1), full[i], atol=1e-5, rtol=1e-5)


def test_chunked_decode_equals_full_pass(qkv):
    """Prefill of 5, then chunks of 1 and 4: the cache carries the last kl-1 rows across calls."""
    x = x_of(seed=4, length=10)
    full = qkv(x)
    cache = qkv.init_cache(2, x.shape[1], jnp.float32)
    parts = []
    for lo, hi in ((0, 5), (5, 6), (6, 10)):
        out, cache = qkv.decode(x[:, lo:hi], cache, lo)
        parts.append(out)
    assert cache["history"].shape == (2, 2, S, M)
    for i in range(3):
        np.testing.assert_allclose(jnp.concatenate([p[i] for p in parts], 1), full[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("output", ["none", "mult"])
def test_attention_with_sparse_qkv_decode_equals_forward(qkv, output):
    out = None if output == "none" else MultiplicativeDense(D, D, S, rngs=nnx.Rngs(5))
    attn = CausalSelfAttention(d_model=D, n_heads=H, qkv=qkv, out=out)
    x = x_of(seed=6, length=8)
    full = attn(x)
    cache = attn.init_cache(2, 8, jnp.float32)
    steps = []
    for t in range(8):
        y, cache = attn.decode(x[:, t:t + 1], cache, t)
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert attn.params_per_token() == qkv.params_per_token() + (0 if out is None else out.params_per_token())


def test_parameter_counts_are_closed_form(qkv):
    total = sum(p.size for p in jax.tree.leaves(nnx.state(qkv, nnx.Param)))
    want = (D * S + D * M + D) + 2 * (3 * 3 * M * M + M) + (3 * 1 * M * M + M)
    assert total == want == qkv.params_per_token()


def test_initialisation_follows_the_reference():
    layer = MultiplicativeDense(256, 256, 16, rngs=nnx.Rngs(0))
    assert abs(float(jnp.std(layer.gates[...])) - 0.5) < 0.02  # D ~ N(0, 0.5^2)
    assert float(jnp.abs(layer.kernel[...]).max()) <= np.sqrt(6.0 / (256 + 16))  # Glorot-uniform E
    assert float(jnp.abs(layer.bias[...]).max()) < 1e-5  # bias ~ N(0, 1e-6^2)


def test_bad_sizes_fail_clearly():
    with pytest.raises(ValueError, match="attn_sparsity"):
        SparseQKV(30, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="module_kernel"):
        ModuleConv(4, 8, module_kernel=2, rngs=nnx.Rngs(0))
