"""The external memory (scaling_sparse/datastore.py): build and search round trip (exact search is the
NumPy top-k of the stored float16 keys; IVF-PQ finds most of them), the stored values are the training
stream's next tokens, kNN-LM with lambda 0 is the plain evaluation, the scores follow the formula on
a hand-made case, and a missing, interrupted or stale datastore is a clear error."""

import json
import pathlib

import numpy as np
import pytest

from conftest import run_cli
from scaling_sparse import datastore

pytestmark = pytest.mark.xdist_group("datastore")  # one worker trains the module's workdir once

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workdir(corpus, tmp_path_factory):
    w = tmp_path_factory.mktemp("ds") / "w"
    code, _, err = run_cli(None, "train", f"--config={ROOT / 'experiments' / 'configs' / 'tiny.py'}", f"--workdir={w}",
                           "--config.data.source=files", f"--config.data.path={corpus}", "--config.model.vocab_size=128",
                           "--config.train.num_steps=6", "--config.train.sample_at_end=False",
                           "--config.train.progress=False")
    assert code == 0, err
    code, _, err = run_cli(None, "datastore", f"--workdir={w}", "--datastore_tokens=3000")
    assert code == 0, err
    return w


def test_exact_search_is_the_numpy_top_k_and_values_are_the_next_tokens(workdir):
    store = datastore.Datastore(workdir)
    assert store.meta["count"] == 3000 and store.meta["index"] == "flat_ip" and store.meta["step"] == 6
    keys = np.asarray(store.keys, np.float32)
    queries = keys[[0, 17, 2999]] + 0.01
    scores, values = store.search(queries, 5)
    brute = queries @ keys.T
    top = np.argsort(-brute, axis=1)[:, :5]
    np.testing.assert_allclose(scores, np.take_along_axis(brute, top, 1), rtol=1e-4)
    np.testing.assert_array_equal(values, store.values[top])
    # values: the training stream's tokens after each key's position, windows in order
    from scaling_sparse.train import load_data
    from scaling_sparse.stored_config import get_config

    config = get_config(str(workdir))
    data = load_data(config, workdir)
    seq_len = config.train.seq_len
    stream = data.train.stream
    want = np.concatenate([stream[i * seq_len + 1: i * seq_len + seq_len + 1] for i in range(3000 // seq_len + 1)])
    np.testing.assert_array_equal(store.values, want[:3000])


def test_ivf_pq_above_the_exact_size_finds_most_neighbours(workdir, monkeypatch, tmp_path):
    import shutil

    from scaling_sparse.stored_config import get_config

    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    monkeypatch.setattr(datastore, "EXACT_MAX", 1000)
    meta = datastore.build(get_config(str(copy)), copy, max_tokens=4000, echo=lambda s: None)
    assert meta["index"].startswith("ivf") and meta["count"] == 4000
    store = datastore.Datastore(copy)
    scores, values = store.search(np.asarray(store.keys[:3], np.float32), 10)
    assert scores.shape == values.shape == (3, 10) and (values >= 0).all()

    # Recall on keys with structure (a model trained 6 steps gives nearly equal keys, all within PQ's
    # error of each other): 4000 random keys through the same index construction.
    keys = np.random.default_rng(0).normal(size=(4000, 32)).astype(np.float16)
    path = tmp_path / "keys.f16"
    keys.tofile(path)
    index = datastore._make_index(datastore._faiss(), np.memmap(path, np.float16, mode="r", shape=keys.shape),
                                  echo=lambda s: None)
    queries = keys[::100].astype(np.float32)
    _, approx = index.search(queries, 10)
    exact = np.argsort(-(queries @ keys.astype(np.float32).T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    print(f"IVF-PQ recall@10 against exact search: {recall:.2f}")
    assert recall >= 0.6


def test_knn_lm_at_lambda_0_is_the_plain_evaluation_and_ext_scores_with_the_neighbours(workdir):
    code, out, err = run_cli(None, "eval", f"--workdir={workdir}", "--json")
    assert code == 0, err
    plain = json.loads(out)["eval_loss"]
    code, out, err = run_cli(None, "eval", f"--workdir={workdir}", "--json", "--datastore", "--memory=none",
                             "--knn_lambda=0")
    assert code == 0, err
    assert json.loads(out)["eval_loss"] == pytest.approx(plain, rel=1e-5)
    for memory in ("none", "local", "long"):
        code, out, err = run_cli(None, "eval", f"--workdir={workdir}", "--json", "--datastore", f"--memory={memory}",
                                 "--knn_k=64")
        assert code == 0, err
        result = json.loads(out)
        assert np.isfinite(result["eval_loss"]) and result["eval_loss"] != pytest.approx(plain, rel=1e-6)
        assert result["datastore"]["k"] == 64 and result["datastore"]["count"] == 3000


def test_the_scores_follow_the_formula_on_a_hand_made_case():
    rng = np.random.default_rng(0)
    b, t, v, d = 1, 2, 3, 4
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    g = rng.normal(size=(b, t, d)).astype(np.float32)
    targets = np.array([[2, 1]])
    weights = np.ones((b, t), np.float32)
    knn_scores = np.array([[1.0, 0.5], [2.0, -1.0]], np.float32)
    knn_values = np.array([[2, 0], [1, 1]])
    lam, tau, tau_knn = 0.3, 1.2, 10.5
    got = datastore.knn_token_losses(logits, g, targets, weights, knn_scores, knn_values, memory="local",
                                     temperature=tau, knn_lambda=lam, knn_temperature=tau_knn)
    for i in range(t):
        f, y = logits[0, i].astype(np.float64), targets[0, i]
        memory = [(g[0, i] @ g[0, j] / np.sqrt(d) / tau, targets[0, j]) for j in range(i)]  # own row, earlier
        memory += [(s / np.sqrt(d) / tau, val) for s, val in zip(knn_scores[i], knn_values[i])]
        p_joint = (np.exp(f[y]) + sum(np.exp(s) for s, w in memory if w == y)) / (np.exp(f).sum() + sum(np.exp(s) for s, _ in memory))
        p_knn = sum(np.exp(s / tau_knn) for s, w in zip(knn_scores[i], knn_values[i]) if w == y) / np.exp(knn_scores[i] / tau_knn).sum()
        assert got[0, i] == pytest.approx(-np.log((1 - lam) * p_joint + lam * p_knn), rel=1e-6)


def test_a_missing_interrupted_or_stale_datastore_is_a_clear_error(workdir, tmp_path):
    import shutil

    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "datastore")
    code, _, err = run_cli(None, "eval", f"--workdir={copy}", "--datastore")
    assert code == 1 and "has no datastore" in err and "datastore --workdir=" in err
    (copy / "datastore.partial").mkdir()
    code, _, err = run_cli(None, "eval", f"--workdir={copy}", "--datastore")
    assert code == 1 and "a build was interrupted" in err
    shutil.copytree(workdir / "datastore", copy / "datastore")
    meta = json.loads((copy / "datastore" / "meta.json").read_text())
    (copy / "datastore" / "meta.json").write_text(json.dumps({**meta, "step": 3}))
    code, _, err = run_cli(None, "eval", f"--workdir={copy}", "--datastore")
    assert code == 1 and "holds the keys of step 3, but step 6" in err
