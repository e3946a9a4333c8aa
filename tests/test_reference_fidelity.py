"""Issue 13, Part A: each difference from the authors' code (docs/semantics.md §5b) checked against the
reference's formula: initialisers by their statistics, LSH logits on a hand-built input, dropout
placement, the shared qk, the stored LSH buckets, the SRU branch's input. The optimizer items
(weight-decay curve, which arrays Adafactor factors) are in test_reference_fidelity_optimizer.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SPARSE_ALL, make_model, random_normal, tiny_config
from scaling_sparse.layers import lsh
from scaling_sparse.layers.attention import CausalSelfAttention
from scaling_sparse.layers.factory import make_attention, make_ffn
from scaling_sparse.layers.multiplicative import ModuleConv
from scaling_sparse.layers.reversible import ReversibleStack
from scaling_sparse.layers.sparse_ffn import SparseFF
from scaling_sparse.layers.sparse_qkv import SparseQKV
from scaling_sparse.layers.qkv import DenseQKV
from scaling_sparse.config import ModelConfig


# 1. Token embedding: uniform with std 1/sqrt(d) -------------------------------------------------------
def test_token_embedding_is_uniform_with_std_one_over_sqrt_d():
    d = 256
    emb = np.asarray(make_model(d_model=d, d_ff=512, vocab_size=512, n_heads=4).token_embed[...])
    limit = np.sqrt(3.0 / d)
    assert np.abs(emb).max() <= limit and np.abs(emb).max() > 0.99 * limit  # uniform on [-a, a]
    np.testing.assert_allclose(emb.std(), 1 / np.sqrt(d), rtol=0.02)


# 2. LSH logits: unit-length key (RMS-normalised, / sqrt(d_k)), query unscaled ------------------------
def test_lsh_logits_match_the_reference_formula_on_a_hand_built_input():
    qk = jnp.array([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0]])  # 3 tokens, d_k 4
    v = jnp.eye(3, 4)[:, None, :]                                                         # v_j = e_j
    out = lsh.lsh_attention(qk[None, :, None, :], v[None], chunk_len=8, n_buckets=1)[0, :, 0, :3]
    # Reference: k_j = qk_j / sqrt(mean(qk_j^2) + 1e-6) / sqrt(d_k); logit = qk_i . k_j; own logit -1e5.
    k = qk / np.sqrt(np.mean(np.square(qk), -1, keepdims=True) + 1e-6) / 2.0
    logits = np.array(qk) @ np.array(k).T
    np.testing.assert_allclose(logits[2, 1], (0 + 6 + 0 + 0) / np.sqrt(8), rtol=1e-5)  # q2 . unit(k1)
    for i in range(3):
        row = np.where(np.arange(3) < i, logits[i], -np.inf)
        row[i] = -1e5 if i else 0.0
        want = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        np.testing.assert_allclose(out[i], want, atol=1e-6)
    # Decoding scores the cache with the same formula.
    k_all = lsh.length_normalized(qk)[None, :, None, :]
    step = lsh.attend_cache(qk[None, 2:3, None, :], k_all, v[None], jnp.array([2]))[0, 0, 0, :3]
    np.testing.assert_allclose(step, out[2], atol=1e-6)


# 3. SparseFF: one dropout, on its output ------------------------------------------------------------
def test_sparse_ffn_drops_its_output_not_its_hidden_units():
    kwargs = dict(d_model=16, d_ff=32, n_elements=4, quant_prob=0.5)
    dropped = SparseFF(**kwargs, dropout_rate=0.5, rngs=nnx.Rngs(0))
    plain = SparseFF(**kwargs, dropout_rate=0.0, rngs=nnx.Rngs(0))  # same weights, same masks (same rng)
    x, rng = random_normal(1, (2, 6, 16)), jax.random.PRNGKey(3)
    y, y0 = dropped(x, mode="train", rng=rng), plain(x, mode="train", rng=rng)
    y, y0 = np.asarray(y), np.asarray(y0)
    kept = y != 0
    assert 0.3 < kept.mean() < 0.7
    # Every output is either dropped or the undropped output / (1 - rate): nothing inside was dropped.
    np.testing.assert_allclose(y[kept], 2 * y0[kept], rtol=1e-5)


# 4. Sparse-QKV convolution kernels: Glorot-normal, fans without the receptive field -----------------
def test_conv_kernels_are_normal_with_std_one_over_sqrt_m():
    m = 64
    kernel = np.asarray(ModuleConv(4, m, length_kernel=3, module_kernel=3, rngs=nnx.Rngs(0)).kernel[...])
    assert kernel.shape == (3, 3, m, m)
    np.testing.assert_allclose(kernel.std(), 1 / np.sqrt(m), rtol=0.02)
    kurtosis = np.mean(kernel ** 4) / np.mean(kernel ** 2) ** 2
    assert abs(kurtosis - 3.0) < 0.15  # normal (a uniform's is 1.8)


# 7. Reversible stack: the LSH buckets of the forward pass are reused by the recomputation ------------
def test_reversible_lsh_hashes_once_per_layer_and_matches_plain_autodiff(monkeypatch):
    fields = dict(reversible=True, attention="lsh", lsh_chunk_len=4, lsh_n_buckets=4, n_layers=2)
    model = make_model(**fields)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 16)), jnp.int32)
    hashed = []
    original = lsh.LSHAttention.hash

    def counting_hash(self, qk, *, train, rng=None):
        buckets = original(self, qk, train=train, rng=rng)
        jax.debug.callback(lambda b: hashed.append(np.asarray(b)), buckets)
        return buckets

    monkeypatch.setattr(lsh.LSHAttention, "hash", counting_hash)

    def loss(m, recompute):
        m.stack.recompute = recompute
        logits = m(tokens, mode="train", rng=jax.random.PRNGKey(5))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

    value, grads = nnx.value_and_grad(lambda m: loss(m, True))(model)
    jax.effects_barrier()
    # 2 blocks x 2 attention sub-layers hash once each, in the forward pass; the backward pass's
    # recomputation reuses the stored buckets instead of hashing its rebuilt inputs again.
    assert len(hashed) == 4
    assert isinstance(model.stack, ReversibleStack)
    value_plain, grads_plain = nnx.value_and_grad(lambda m: loss(m, False))(model)
    np.testing.assert_allclose(value, value_plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_plain)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


# 8. LSH with sparse QKV: shared qk = (Q + K) / 2; with dense QKV no K is built ----------------------
def test_lsh_with_sparse_qkv_shares_the_mean_of_q_and_k():
    m = ModelConfig.from_config(tiny_config(attn_sparsity=4, **dict(attention="lsh", lsh_chunk_len=64)).model)
    attn = make_attention(m, nnx.Rngs(0))
    assert isinstance(attn.qkv, SparseQKV)
    x = random_normal(2, (2, 10, m.d_model))
    q, k, v = attn.qkv(x)
    heads = lambda a: a.reshape(2, 10, m.n_heads, -1)  # noqa: E731
    want = lsh.lsh_attention(heads((q + k) / 2), heads(v), chunk_len=64).reshape(2, 10, -1)
    np.testing.assert_allclose(attn(x, mode="eval"), want, atol=1e-5)


def test_lsh_with_dense_qkv_builds_no_key_projection():
    d = 32
    with_lsh = make_model(attention="lsh").stack.blocks[0].attn
    full = make_model().stack.blocks[0].attn
    assert with_lsh.qkv.k is None and full.qkv.k is not None
    assert with_lsh.params_per_token() == full.params_per_token() - (d * d + d)


# 9. Terraformer FFN: SRU on its own LayerNorm of the raw stream; no dropout on the attention half-residual
def test_sru_branch_normalises_the_raw_stream():
    m = ModelConfig.from_config(tiny_config(ff_sru_units=8, ff_sparsity=8).model)
    ffn = make_ffn(m, nnx.Rngs(0))
    for norm, seed in ((ffn.main_norm, 1), (ffn.sru_norm, 2)):  # distinct, non-trivial norms
        norm.scale[...] = 1.0 + random_normal(seed, norm.scale.shape)
        norm.bias[...] = random_normal(seed + 10, norm.bias.shape)
    x = 3.0 * random_normal(3, (2, 7, m.d_model)) + 1.0
    want = ffn.main(ffn.main_norm(x)) + ffn.sru_out(ffn.sru(ffn.sru_in(ffn.sru_norm(x))))
    np.testing.assert_allclose(ffn(x), want, atol=1e-5)
    block = make_model(reversible=True, ff_sru_units=8, ff_sparsity=8).stack.blocks[0]
    assert block.ffn_norm is None  # the block hands the FFN the raw stream


def test_reversible_attention_half_residual_has_no_output_dropout():
    block = make_model(reversible=True, dropout=0.5, attn_dropout=0.0).stack.blocks[0]
    a = random_normal(4, (2, 8, 32))
    train, _ = block.residual(0, a, mode="train", rng=jax.random.PRNGKey(0))
    evaluated, _ = block.residual(0, a, mode="eval")
    np.testing.assert_allclose(train, evaluated, atol=1e-6)


# 10. Dense QKV: three Dense(d, d), each Glorot-uniform over its own [d, d] ---------------------------
def test_dense_qkv_is_three_glorot_uniform_d_by_d_matrices():
    d = 256
    qkv = DenseQKV(d, rngs=nnx.Rngs(0))
    limit = np.sqrt(6.0 / (d + d))
    for proj in (qkv.q, qkv.k, qkv.v):
        kernel = np.asarray(proj.kernel[...])
        assert kernel.shape == (d, d)
        assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.99 * limit
        np.testing.assert_allclose(kernel.std(), limit / np.sqrt(3), rtol=0.02)
    assert qkv.params_per_token() == 3 * (d * d + d)


# 11. Dense biases N(0, 1e-6^2) ---------------------------------------------------------------------
@pytest.mark.parametrize("where", ["qkv", "ffn", "output"])
def test_dense_biases_are_normal_with_std_1e_minus_6(where):
    model = make_model(d_model=256, d_ff=1024, vocab_size=4096, n_heads=4, n_layers=1)
    block = model.stack.blocks[0]
    bias = {"qkv": lambda: block.attn.qkv.q.bias, "ffn": lambda: block.ffn.w_in.bias,
            "output": lambda: model.output.bias}[where]()
    bias = np.asarray(bias[...])
    assert np.abs(bias).max() > 0
    np.testing.assert_allclose(bias.std(), 1e-6, rtol=0.1)
