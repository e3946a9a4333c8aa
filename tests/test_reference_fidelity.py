"""Issue 13, Part A: each difference from the authors' code (docs/semantics.md §5b) checked against the
reference's formula: initialisers by their statistics, LSH logits on a hand-built input, dropout
placement, the shared qk, the stored LSH buckets, the SRU branch's input; and the optimizer items
(docs/semantics.md §5c): the weight-decay curve and Adafactor's factoring, each against trax's
`Adafactor.update` (trax/optimizers/adafactor.py) written out in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from conftest import make_model, random_normal, tiny_config
from scaling_sparse.layers import lsh
from scaling_sparse.layers.factory import make_attention, make_ffn
from scaling_sparse.layers.multiplicative import ModuleConv
from scaling_sparse.layers.reversible import ReversibleStack
from scaling_sparse.layers.sparse_ffn import SparseFF
from scaling_sparse.layers.sparse_qkv import SparseQKV
from scaling_sparse.layers.qkv import DenseQKV
from scaling_sparse.adafactor import reference_factored_dims
from scaling_sparse.config import ModelConfig, load_config
from scaling_sparse.optim import make_optimizer, make_weight_decay_schedule
from scaling_sparse.state import model_spec


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
    k_t = lsh.length_normalized(qk).T[None]                   # the cache layout [b*h, dh, S]
    step = lsh.attend_cache(qk[None, 2:3, None, :], k_t, v[None, :, 0], jnp.array([2]))[0, 0, 0, :3]
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


# 5. and 6. Weight decay falling linearly to 0; Adafactor factored as trax stores each weight ------------
N_WD = 100_000


def train_settings(**fields):
    t = load_config("tiny").train
    t.update(**fields)
    return t


# ----------------------------------------------------------------------------- trax, in NumPy

def trax_weight_decay(rate, n, step):
    """trax Adafactor.update: the decay rate at trax's step (its first update is step 1)."""
    return rate if n < 1 else rate * max(n - step, 0.0) / max(n, 0.0)


def trax_slots(w):
    """trax Adafactor.init: (v_row, v_col) for >= 2 dims, else (v,)."""
    if w.ndim >= 2:
        return [np.zeros(w.shape[:-1]), np.zeros(w.shape[:-2] + w.shape[-1:])]
    return [np.zeros_like(w)]


def trax_update(step, g, w, slots, lr, wd_rate, wd_steps, clip=1.0, eps1=1e-16, eps2=1e-3):
    """trax Adafactor.update (beta1 0, decay_rate 0.8, factored, parameter scale, clipping), float64."""
    wd = trax_weight_decay(wd_rate, wd_steps, step)
    decay = 1.0 - (step + 1.0) ** -0.8
    scale = lr * max(np.sqrt(np.mean(w * w)), eps2)
    g2 = g * g
    if w.ndim >= 2:
        v_row = decay * slots[0] + (1 - decay) * g2.mean(-1)
        v_col = decay * slots[1] + (1 - decay) * g2.mean(-2)
        row_factor = (v_row.mean(-1, keepdims=True) / (v_row + eps1)) ** 0.5
        y = g * row_factor[..., None] * ((v_col + eps1) ** -0.5)[..., None, :]
        slots = [v_row, v_col]
    else:
        v = decay * slots[0] + (1 - decay) * g2
        y = g * (v + eps1) ** -0.5
        slots = [v]
    y = y / max(1.0, np.sqrt(np.mean(y * y)) / clip)
    return (1 - wd) * w - scale * y, slots


# Our sparse-FFN storage [B, N, d] -> trax's (its _SparseFFMain): W1 [d, B, N], W2 [N, B, d].
TO_TRAX = {"w1": (2, 0, 1), "w2": (1, 0, 2)}


def trax_layout(name, w):
    return np.transpose(w, TO_TRAX[name]) if name in TO_TRAX else w


def from_trax_layout(name, w):
    return np.transpose(w, np.argsort(TO_TRAX[name])) if name in TO_TRAX else w


# ----------------------------------------------------------------------------- (a) weight decay

def test_weight_decay_falls_linearly_to_zero_as_trax_schedules_it():
    schedule = make_weight_decay_schedule(train_settings(weight_decay=1e-5, weight_decay_steps=N_WD))
    for fraction in (0.0, 0.25, 0.5, 1.0, 1.5):
        count = int(fraction * N_WD)  # optax's count; trax's step is count + 1
        np.testing.assert_allclose(float(schedule(count)), trax_weight_decay(1e-5, N_WD, count + 1),
                                   rtol=1e-6, atol=1e-16)
    assert float(schedule(N_WD)) == 0.0 and float(schedule(2 * N_WD)) == 0.0
    constant = make_weight_decay_schedule(train_settings(weight_decay=1e-5, weight_decay_steps=0))
    assert float(constant(0)) == float(constant(10 * N_WD)) == pytest.approx(1e-5)


def test_a_zero_gradient_step_only_decays_the_weights_not_by_the_learning_rate():
    # trax: w <- (1 - wd_t) w - lr * scale * y, and y = 0 for a zero gradient.
    n, rate = 10, 0.1
    tx = make_optimizer(train_settings(weight_decay=rate, weight_decay_steps=n, learning_rate=7.0, warmup_steps=1))
    params = {"w": jnp.full((3, 2), 2.0), "b": jnp.ones(2)}
    zero = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def run(params, steps):
        def step(_, carry):
            params, state = carry
            updates, state = tx.update(zero, state, params)
            return optax.apply_updates(params, updates), state
        return jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))[0]

    one = run(params, 1)
    np.testing.assert_allclose(one["w"], (1 - rate * (n - 1) / n) * 2.0, rtol=1e-6)
    # 15 steps: the rate falls to 0 at trax step 10 and stays there.
    factor = np.prod([1 - trax_weight_decay(rate, n, s) for s in range(1, 16)])
    np.testing.assert_allclose(run(params, 15)["b"], factor, rtol=1e-5)


# ----------------------------------------------------------------------------- (b) which arrays

def test_adafactor_factors_every_model_weight_as_trax_stores_it():
    # ff_sparsity 4: B 16, N 4, d 32, r 16 (all distinct), S 4 for QKV and the loss.
    c = tiny_config(ff_sparsity=4, attn_sparsity=4, loss_sparsity=4, loss_type="mult")
    spec = model_spec(ModelConfig.from_config(c.model))
    state = jax.eval_shape(make_optimizer(c.train, spec.axes).init, spec.params)[0]
    flat = {k: traverse_util.flatten_dict(getattr(state, k)) for k in ("v_row", "v_col", "v")}
    axes = traverse_util.flatten_dict(spec.axes, is_leaf=lambda _, x: isinstance(x, tuple))
    seen = set()
    for path, p in traverse_util.flatten_dict(spec.params).items():
        name = str(path[-1])
        trax_shape = tuple(p.shape[i] for i in TO_TRAX[name]) if name in TO_TRAX else p.shape
        row, col, full = (flat[k][path].shape for k in ("v_row", "v_col", "v"))
        if len(trax_shape) >= 2:  # trax: v_row = shape[:-1], v_col = shape[:-2] + shape[-1:], no minimum
            assert sorted(row) == sorted(trax_shape[:-1]), path
            assert sorted(col) == sorted(trax_shape[:-2] + trax_shape[-1:]), path
            assert full == ()
        else:
            assert full == p.shape and row == col == (), path
        seen.add((axes[path], name if name in TO_TRAX else ""))
    b, n, d, r, m = 16, 4, 32, 16, 8
    ffn = {k: v for k, v in traverse_util.flatten_dict(state.v_row).items() if "ffn" in map(str, k)}
    w1 = next(k for k in ffn if str(k[-1]) == "w1")
    w2, c2, cb = (w1[:-1] + (x,) for x in ("w2", "c2", "cb"))
    # W1 (trax [d, B, N]) over (B, N) per d; W2 (trax [N, B, d]) over (B, d) per N.
    assert (flat["v_row"][w1].shape, flat["v_col"][w1].shape) == ((b, d), (n, d))
    assert (flat["v_row"][w2].shape, flat["v_col"][w2].shape) == ((b, n), (n, d))
    assert (flat["v_row"][c2].shape, flat["v_col"][c2].shape) == ((r, b), (r, n))  # trax [r, B, N]
    assert (flat["v_row"][cb].shape, flat["v_col"][cb].shape) == ((b,), (n,))      # trax [B, N]
    # Every kind of weight was looked at: the sparse FFN, conv kernels, gates D, embeddings, norms.
    for expected in [(("blocks", "units", "embed"), "w1"), (("blocks", "units", "embed"), "w2"),
                     ((None, None, "conv", "conv"), ""), (("modules", "embed"), ""), (("vocab", "embed"), ""),
                     (("norm",), ""), (("lowrank", "blocks", "units"), ""), (("blocks", "units"), "")]:
        assert expected in seen, expected
    conv = next(k for k, a in axes.items() if a == (None, None, "conv", "conv"))  # [kl, ks, M, M] over (M, M)
    kernel = traverse_util.flatten_dict(spec.params)[conv].shape
    assert kernel[-2:] == (m, m) and flat["v_row"][conv].shape == flat["v_col"][conv].shape == kernel[:-1]


def test_an_unknown_sparse_ffn_weight_is_an_error_not_a_guess():
    assert reference_factored_dims("w1", (4, 2, 8), ("blocks", "units", "embed")) == (0, 1)
    assert reference_factored_dims("w2", (4, 2, 8), ("blocks", "units", "embed")) == (0, 2)
    assert reference_factored_dims("b", (8,), ("embed",)) is None
    with pytest.raises(ValueError, match="w3"):
        reference_factored_dims("w3", (4, 2, 8), ("blocks", "units", "embed"))


# ----------------------------------------------------------------------------- (c) the update itself

def test_three_steps_equal_trax_adafactor_update_in_numpy():
    b, n, d, v = 3, 4, 5, 6
    rng = np.random.default_rng(0)
    shapes = {"ffn": {"w1": (b, n, d), "w2": (b, n, d), "c2": (2, b, n), "cb": (b, n), "b2": (d,)},
              "conv": (2, 3, 4, 4), "embed": (v, d)}
    axes = {"ffn": {"w1": ("blocks", "units", "embed"), "w2": ("blocks", "units", "embed"),
                    "c2": ("lowrank", "blocks", "units"), "cb": ("blocks", "units"), "b2": ("embed",)},
            "conv": (None, None, "conv", "conv"), "embed": ("vocab", "embed")}
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)  # noqa: E731
    params = jax.tree.map(lambda s: rng.standard_normal(s) * 0.1, shapes, is_leaf=is_shape)
    grads = [jax.tree.map(lambda s: rng.standard_normal(s) * 10.0 ** rng.integers(-3, 1), shapes, is_leaf=is_shape)
             for _ in range(3)]
    for g in grads:  # gradients near sqrt(epsilon1) = 1e-8, where epsilon1 matters
        g["ffn"]["b2"], g["ffn"]["cb"] = g["ffn"]["b2"] * 1e-8, g["ffn"]["cb"] * 1e-8
    # lr 0.5 / sqrt(max(step, 2)) (trax's constant * rsqrt_decay); decay 0.01 falling to 0 at step 2.
    t = train_settings(learning_rate=0.5, warmup_steps=2, weight_decay=0.01, weight_decay_steps=2, grad_clip=1.0)
    tx = make_optimizer(t, axes)

    ours = jax.tree.map(jnp.float32, params)
    state = tx.init(ours)
    update = jax.jit(tx.update)
    flat_w = traverse_util.flatten_dict(params)
    trax_w = {k: trax_layout(str(k[-1]), w) for k, w in flat_w.items()}
    slots = {k: trax_slots(w) for k, w in trax_w.items()}
    for i, g in enumerate(grads):
        step = i + 1  # trax's step
        updates, state = update(jax.tree.map(jnp.float32, g), state, ours)
        ours = optax.apply_updates(ours, updates)
        for k, gk in traverse_util.flatten_dict(g).items():
            trax_w[k], slots[k] = trax_update(step, trax_layout(str(k[-1]), gk), trax_w[k], slots[k],
                                              lr=0.5 / np.sqrt(max(step, 2)), wd_rate=0.01, wd_steps=2)
        if i == 0:  # the factored statistics themselves: W1's are trax's [d, B] and [d, N], transposed
            fs = state[0]
            w1 = ("ffn", "w1")
            np.testing.assert_allclose(fs.v_row["ffn"]["w1"], slots[w1][0].T, rtol=1e-5)
            np.testing.assert_allclose(fs.v_col["ffn"]["w1"], slots[w1][1].T, rtol=1e-5)
    for k, w in traverse_util.flatten_dict(ours).items():
        np.testing.assert_allclose(w, from_trax_layout(str(k[-1]), trax_w[k]), rtol=1e-5, atol=1e-7, err_msg=str(k))
