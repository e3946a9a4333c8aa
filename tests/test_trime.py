"""TRIME's objective (scaling_sparse/trime_loss.py): the loss equals a NumPy implementation of the
formula for each memory kind, equals cross-entropy where nothing is visible, no position sees its own
or a later token, gradients stay finite with fully masked rows; the model's features are the last
block's FFN LayerNorm output from the same pass; training with it (from scratch and continuing a CE
run) and on a device mesh (sharded equals unsharded)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import make_model, run_cli, xla_flags
from scaling_sparse.config import ConfigError, load_config, validate
from scaling_sparse.metrics import read_metrics
from scaling_sparse.trime_loss import trime_token_losses

ROOT = pathlib.Path(__file__).resolve().parent.parent


def numpy_trime(logits, g, targets, weights, kind, group_rows=1, hide_own=False, temperature=1.0):
    """The formula, one query at a time, with explicit visible sets."""
    b, t, d = g.shape
    out = np.zeros((b, t))
    for qb in range(b):
        for qt in range(t):
            entries = []
            for kb in range(b):
                for kt in range(t):
                    if weights[kb, kt] <= 0:
                        continue
                    own_earlier = kb == qb and kt < qt
                    if kind == "local":
                        ok = own_earlier
                    elif kind == "long":
                        ok = own_earlier or (kb // group_rows == qb // group_rows and kb < qb)
                    else:
                        ok = kb != qb or (own_earlier and not hide_own)
                    if ok:
                        entries.append((float(g[qb, qt] @ g[kb, kt]) / np.sqrt(d) / temperature, targets[kb, kt]))
            f = logits[qb, qt].astype(np.float64)
            y = targets[qb, qt]
            den = np.exp(f).sum() + sum(np.exp(s) for s, _ in entries)
            num = np.exp(f[y]) + sum(np.exp(s) for s, label in entries if label == y)
            out[qb, qt] = -np.log(num / den)
    return out


def random_case(seed=0, b=4, t=6, d=8, v=5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    g = (rng.normal(size=(b, t, d)) * 2).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)  # a small vocabulary: many positives
    weights = np.ones((b, t), np.float32)
    weights[1, -2:] = 0  # padding
    return logits, g, targets, weights


@pytest.mark.parametrize("kind,kwargs", [("local", {}), ("long", {"group_rows": 2}), ("ext", {}),
                                         ("ext", {"hide_own": True}), ("local", {"temperature": 1.2})])
def test_the_loss_equals_the_formula_in_numpy(kind, kwargs):
    logits, g, targets, weights = random_case()
    got = trime_token_losses(jnp.asarray(logits), jnp.asarray(g), jnp.asarray(targets), jnp.asarray(weights), kind,
                             **kwargs)
    np.testing.assert_allclose(np.asarray(got), numpy_trime(logits, g, targets, weights, kind, **kwargs), rtol=2e-5,
                               atol=2e-5)


def test_nothing_visible_is_cross_entropy_and_no_position_sees_its_own_or_a_later_token():
    logits, g, targets, weights = (jnp.asarray(x) for x in random_case(1))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    local = trime_token_losses(logits, g, targets, weights, "local")
    np.testing.assert_allclose(local[:, 0], ce[:, 0], rtol=1e-6)  # the first position has no memory
    no_memory = trime_token_losses(logits, g, targets, jnp.zeros_like(weights), "ext")
    np.testing.assert_allclose(no_memory, ce, rtol=1e-6)

    # d loss[b, t] / d g[b', s]: zero for every later position s > t of the own row (local: also other rows)
    jac = jax.jacobian(lambda f: trime_token_losses(logits, f, targets, weights, "local"))(g)  # [b,t,b,t,d]
    norms = np.abs(np.asarray(jac)).sum(-1)
    b, t = targets.shape
    for qb in range(b):
        for qt in range(t):
            for kb in range(b):
                for kt in range(t):
                    if kb != qb or kt > qt:
                        assert norms[qb, qt, kb, kt] == 0, (qb, qt, kb, kt)
    # its own entry is never in memory: a query identical to nothing else still pays the full loss
    own = np.asarray(g).copy()
    own[0, 3] = 1e3  # a huge self-similarity would make loss[0, 3] ~ 0 if the own entry were visible
    loss = trime_token_losses(logits, jnp.asarray(own), targets, weights, "local")
    assert float(loss[0, 3]) > 0.1


def test_gradients_are_finite_with_fully_masked_rows():
    logits, g, targets, weights = (jnp.asarray(x) for x in random_case(2))
    weights = weights.at[2].set(0.0)  # a padding-only row: its queries and entries count nothing

    def loss(logits, g):
        losses = trime_token_losses(logits, g, targets, weights, "ext", hide_own=True)
        return jnp.sum(losses * weights) / jnp.sum(weights)

    grads = jax.grad(loss, argnums=(0, 1))(logits * 30, g * 30)
    assert all(bool(jnp.isfinite(x).all()) for x in grads)
    assert float(jnp.abs(grads[1][2]).sum()) == 0.0  # nothing reads a masked row's keys


@pytest.mark.parametrize("variant", [dict(), dict(reversible=True, ff_sru_units=8), dict(ff_sparsity=8)])
def test_features_are_the_last_blocks_ffn_layernorm_output_from_the_same_pass(variant):
    model = make_model(**variant)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, model.vocab_size)
    logits, g = model(tokens, features=True)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model(tokens)))
    assert g.shape == (2, 12, model.token_embed.shape[1])
    x = model._embed(tokens, jnp.arange(12))
    last = model.stack.blocks[-1]
    if variant.get("reversible"):
        _, x2 = model.stack.streams(x, x)
        want = last.ffn.main_norm(x2)  # SRU: the main FFN's own LayerNorm of the raw stream
    else:
        for block in model.stack.blocks[:-1]:
            x = block(x)
        x = x + last.attn(last.attn_norm(x))
        want = last.ffn_norm(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_a_cross_entropy_run_evaluates_with_memory_and_continues_with_trime(tmp_path, corpus):
    tiny = ROOT / "experiments" / "configs" / "tiny.py"
    common = [f"--config={tiny}", f"--workdir={tmp_path / 'w'}", "--config.data.source=files",
              f"--config.data.path={corpus}", "--config.model.vocab_size=128", "--config.train.log_every=1",
              "--config.train.sample_at_end=False", "--config.train.progress=False"]
    code, _, err = run_cli(None, "train", *common, "--config.train.num_steps=4")  # plain cross-entropy
    assert code == 0, err
    # Evaluation with memory of this cross-entropy model (the continuous-cache baseline), with a sweep.
    workdir = f"--workdir={tmp_path / 'w'}"
    code, out, err = run_cli(None, "eval", workdir, "--json")
    assert code == 0, err
    plain = json.loads(out)
    for memory in ("local", "long"):
        code, out, err = run_cli(None, "eval", workdir, "--json", f"--memory={memory}", "--memory_temperature=1,2")
        assert code == 0, err
        with_memory = json.loads(out)
        sweep = with_memory["memory_sweep"]
        assert [r["temperature"] for r in sweep] == [1.0, 2.0] and with_memory["memory"] == memory
        assert with_memory["eval_loss"] == min(r["eval_loss"] for r in sweep) != plain["eval_loss"]
        assert with_memory["eval_tokens"] == plain["eval_tokens"] and np.isfinite(with_memory["eval_loss"])
    code, _, err = run_cli(None, "eval", workdir, "--memory=local", "--memory_temperature=0")
    assert code != 0 and "--memory_temperature must be numbers > 0" in err
    code, _, err = run_cli(None, "eval", workdir, "--memory=ext")  # later windows are future text
    assert code != 0 and "would leak it" in err
    code, _, err = run_cli(None, "train", *common, "--config.train.num_steps=8", "--config.train.objective=trime",
                           "--config.train.trime.ce_warmup_fraction=0.75")  # CE until step 6, then TRIME
    assert code == 0, err
    records = {r["step"]: r for r in read_metrics(tmp_path / "w")}
    assert sorted(records) == list(range(1, 9))
    assert "trime" not in records[4] and [records[s]["trime"] for s in (5, 6, 7, 8)] == [0.0, 0.0, 1.0, 1.0]
    assert all(np.isfinite(r["train_loss"]) for r in records.values())


@pytest.mark.parametrize("change,match", [
    (dict(memory="long", source="tfds"), "TRIME_long needs batches of consecutive segments"),
    (dict(memory="long", group_rows=3), "does not divide train.batch_size"),
    (dict(ce_warmup_fraction=1.0), "ce_warmup_fraction"),
    (dict(arch="encdec"), "decoder-only language-model objective"),
])
def test_settings_trime_cannot_train_are_refused(change, match):
    c = load_config("tiny")
    c.train.objective = "trime"
    change = dict(change)
    if "source" in change:
        c.data.source = change.pop("source")
    if "arch" in change:
        c.model.arch, c.data.objective = "encdec", "span_corruption"
    else:
        c.train.trime.update(change)
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_trime_long_batches_are_consecutive_segments_and_resume():
    from scaling_sparse.data.consecutive import ConsecutiveIterator

    stream = np.arange(1000, dtype=np.int32)
    it = ConsecutiveIterator(stream, batch_size=4, seq_len=10, group_rows=2, seed=0)
    batches = [next(it) for _ in range(3)]
    for b in batches:  # within a group, row 1 continues row 0
        np.testing.assert_array_equal(b["inputs"][1::2, 0], b["targets"][0::2, -1])
    for a, b in zip(batches, batches[1:]):  # the next step continues each group's last row
        np.testing.assert_array_equal(b["inputs"][0::2, 0], a["targets"][1::2, -1])
    state = it.get_state()
    want = [next(it) for _ in range(30)]  # across the epoch's end (24 steps per epoch)
    assert it.epoch >= 1
    again = ConsecutiveIterator(stream, batch_size=4, seq_len=10, group_rows=2, seed=0)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again)["inputs"], w["inputs"])
    halves = [ConsecutiveIterator(stream, 4, 10, 2, 0, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([next(h)["inputs"] for h in halves]), batches[0]["inputs"])


def test_trime_long_trains_on_a_local_corpus(tmp_path, corpus):
    tiny = ROOT / "experiments" / "configs" / "tiny.py"
    code, _, err = run_cli(None, "train", f"--config={tiny}", f"--workdir={tmp_path / 'w'}", "--config.data.source=files",
                           f"--config.data.path={corpus}", "--config.model.vocab_size=128", "--config.train.num_steps=3",
                           "--config.train.objective=trime", "--config.train.trime.memory=long",
                           "--config.train.trime.group_rows=2", "--config.train.trime.ce_warmup_fraction=0",
                           "--config.train.log_every=1", "--config.train.sample_at_end=False",
                           "--config.train.progress=False")
    assert code == 0, err
    records = read_metrics(tmp_path / "w")
    assert [r["trime"] for r in records] == [1.0, 1.0, 1.0] and all(np.isfinite(r["train_loss"]) for r in records)


def test_trime_ext_bm25_batches_group_similar_segments_and_resume():
    from scaling_sparse.data.bm25_batches import BM25Iterator, group_windows

    rng = np.random.default_rng(0)
    seq_len, n = 16, 64
    topics = rng.integers(0, 2, n)  # each window drawn from one of two disjoint vocabularies
    stream = np.concatenate([rng.integers(10 + 50 * k, 60 + 50 * k, seq_len) for k in topics] + [[1]]).astype(np.int32)
    order = group_windows(stream, seq_len, batch_size=4, seed=0)
    assert len(order) % 4 == 0 and len(set(order.tolist())) == len(order) >= 56
    pure = [len(set(topics[order[i:i + 4]])) == 1 for i in range(0, len(order), 4)]
    assert np.mean(pure) >= 0.8, pure  # random batches of 4 would be pure 1/8 of the time
    it = BM25Iterator(stream, order, 4, seq_len, seed=0)
    first = next(it)
    np.testing.assert_array_equal(np.sort(first["inputs"][:, 0]),
                                  np.sort(stream[order[it._batch_order()[0] * 4:][:4] * seq_len]))
    state = it.get_state()
    want = [next(it) for _ in range(20)]  # past the epoch's end
    again = BM25Iterator(stream, order, 4, seq_len, seed=0)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again)["inputs"], w["inputs"])
    halves = [BM25Iterator(stream, order, 4, seq_len, 0, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([next(h)["inputs"] for h in halves]), first["inputs"])


def test_trime_ext_trains_on_bm25_batches_cached_in_the_workdir(tmp_path, corpus):
    tiny = ROOT / "experiments" / "configs" / "tiny.py"
    args = ["train", f"--config={tiny}", f"--workdir={tmp_path / 'w'}", "--config.data.source=files",
            f"--config.data.path={corpus}", "--config.model.vocab_size=128", "--config.train.objective=trime",
            "--config.train.trime.memory=ext", "--config.train.trime.ce_warmup_fraction=0",
            "--config.train.log_every=1", "--config.train.sample_at_end=False", "--config.train.progress=False"]
    code, _, err = run_cli(None, *args, "--config.train.num_steps=2")
    assert code == 0, err
    cached = list((tmp_path / "w" / "data_cache").glob("*.bm25-*.npy"))
    assert len(cached) == 1
    code, _, err = run_cli(None, *args, "--config.train.num_steps=4")  # resumes on the cached grouping
    assert code == 0, err
    assert [r["trime"] for r in read_metrics(tmp_path / "w")] == [1.0] * 4


def test_the_long_fifo_carries_the_previous_batch_as_memory():
    """Two evaluation batches of consecutive windows with a FIFO covering the first: the second batch's
    queries see every earlier token, i.e. the losses of one merged batch under `long` memory."""
    from scaling_sparse import sharding
    from scaling_sparse.memory_eval import evaluate_with_fifo
    from scaling_sparse.train import global_batch

    model = make_model()
    graphdef, params = nnx.split(model)
    b, t = 2, 8
    stream = np.random.default_rng(0).integers(2, 60, 2 * b * t + 1).astype(np.int32)
    windows = np.stack([stream[i * t: i * t + t + 1] for i in range(2 * b)])
    batches = [{"inputs": w[:, :-1], "targets": w[:, 1:], "weights": np.ones((b, t), np.float32)}
               for w in (windows[:b], windows[b:])]
    config = load_config("tiny")
    mesh, rules = sharding.single_device_mesh(), sharding.logical_rules(config.mesh)
    got = evaluate_with_fifo(graphdef, params, [global_batch(x, mesh, rules) for x in batches], mesh, rules,
                             kind="long", temperature=1.3, size=b * t, d_model=model.token_embed.shape[1])
    logits, g = model(jnp.asarray(windows[:, :-1]), features=True)
    merged = trime_token_losses(logits, g, jnp.asarray(windows[:, 1:]), jnp.ones((2 * b, t)), "long",
                                temperature=1.3, group_rows=2 * b)
    assert got["eval_loss"] == pytest.approx(float(merged.mean()), rel=1e-5)
    assert got["eval_tokens"] == 2 * b * t


@pytest.mark.xdist_group("trime_sharded")
def test_sharded_trime_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "trime_sharded.py")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and len(report) == 5
    for name, r in report.items():
        if name == "devices":
            continue
        assert r["used_trime"] == 1.0 and r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5), name
        assert r["max_grad_diff"] < 2e-6 * max(r["grad_scale"], 1.0), name
