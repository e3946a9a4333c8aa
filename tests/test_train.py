"""The training loop: it learns, resumes exactly after SIGTERM or a finished run, logs and prunes.

The data is a small in-memory object with the pipeline's interface (tokenizer, resumable train
iterator, eval batches), so these tests exercise the loop, not the tokenizer; tests/test_cli.py
runs the real pipeline end to end. All runs share one model shape, so the train step compiles once.
"""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling_sparse.checkpoint import Checkpointer
from scaling_sparse.config import load_config
from scaling_sparse.metrics import read_metrics
from scaling_sparse.optim import make_optimizer, make_schedule
from scaling_sparse.train import evaluate, load_params, train

# One xdist worker runs this module's tests: its module-scoped training run is then made once
# (`--dist loadgroup` otherwise schedules each test on its own).
pytestmark = pytest.mark.xdist_group("train")

VOCAB = 64


class CharTokenizer:
    vocab_size, pad_id, eos_id = VOCAB, 0, 1

    def encode(self, text):
        return [2 + ord(c) % (VOCAB - 2) for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


class ArrayIterator:
    """Cycles through fixed batches; its state is the position, as the real iterator's is."""

    def __init__(self, windows):
        self.windows, self.position = windows, 0

    def __next__(self):
        w = self.windows[self.position % len(self.windows)]
        self.position += 1
        return {"inputs": w[:, :-1], "targets": w[:, 1:], "weights": np.ones(w[:, 1:].shape, np.float32)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


class SyntheticData:
    def __init__(self, config, n_batches, seed=0):
        shape = (n_batches, config.train.batch_size, config.train.seq_len + 1)
        windows = np.random.RandomState(seed).randint(2, VOCAB, size=shape).astype(np.int32)
        self.tokenizer = CharTokenizer()
        self.train = ArrayIterator(windows)
        held_out = ArrayIterator(np.random.RandomState(seed + 1).randint(2, VOCAB, size=shape[1:])[None])
        self.eval_batches = [next(held_out)]
        self.stats = {}


class SignalAt(ArrayIterator):
    """Sends `signum` to this process when batch `at` (0-based, counted from the start) is fetched."""

    def __init__(self, inner, at, signum=signal.SIGTERM):
        super().__init__(inner.windows)
        self.at, self.signum = at, signum

    def __next__(self):
        if self.position == self.at:
            os.kill(os.getpid(), self.signum)
        return super().__next__()


def tiny_config(**train):
    config = load_config("tiny")
    config.train.update(dict(num_steps=12, log_every=1, eval_every=5, checkpoint_every=5, keep_checkpoints=2,
                             sample_at_end=False, progress=False), **train)
    return config


def losses(workdir, key="train_loss"):
    return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 12-step run on 8 distinct batches."""
    config = tiny_config()
    workdir = tmp_path_factory.mktemp("uninterrupted")
    summary = train(config, workdir, data=SyntheticData(config, 8), echo=lambda s: None)
    return config, workdir, summary


def test_overfits_one_batch(tmp_path):
    config = tiny_config(num_steps=20, eval_every=20, checkpoint_every=20)
    train(config, tmp_path, data=SyntheticData(config, 1), echo=lambda s: None)
    curve = losses(tmp_path)
    assert curve[1] > 3.0  # ~ln(62) for random tokens
    assert curve[20] < 0.25 * curve[1], curve


def test_metrics_jsonl_and_checkpoints(reference_run):
    config, workdir, summary = reference_run
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(np.isfinite(r["train_loss"]) and r["tokens_per_s"] > 0 for r in records)
    assert sorted(losses(workdir, "eval_loss")) == [5, 10, 12]  # every eval_every steps and at the end
    assert summary["step"] == 12 and not summary["interrupted"]
    assert summary["eval_loss"] == records[-1]["eval_loss"]
    with Checkpointer(workdir, read_only=True) as ckpt:
        assert ckpt.all_steps() == [10, 12]  # saved at 5, 10, 12; keep_checkpoints=2
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_sigterm_saves_and_the_resumed_run_matches_the_uninterrupted_one(tmp_path, reference_run):
    config, reference, _ = reference_run
    data = SyntheticData(config, 8)
    data.train = SignalAt(data.train, at=6)  # SIGTERM while step 7 is being fetched
    summary = train(config, tmp_path, data=data, echo=lambda s: None)
    assert summary["interrupted"] and summary["step"] == 7 and summary["signal"] == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.latest_step() == 7
    assert max(losses(tmp_path)) == 7

    summary = train(config, tmp_path, data=SyntheticData(config, 8), echo=lambda s: None)
    assert summary["step"] == 12 and not summary["interrupted"]
    want, got = losses(reference), losses(tmp_path)
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)], rtol=1e-6)
    np.testing.assert_allclose(losses(tmp_path, "eval_loss")[12], losses(reference, "eval_loss")[12], rtol=1e-6)


def test_a_finished_run_continues_when_num_steps_is_raised(tmp_path, reference_run):
    config, reference, _ = reference_run
    train(tiny_config(num_steps=5), tmp_path, data=SyntheticData(config, 8), echo=lambda s: None)
    train(config, tmp_path, data=SyntheticData(config, 8), echo=lambda s: None)
    want, got = losses(reference), losses(tmp_path)
    np.testing.assert_allclose([got[s] for s in range(6, 13)], [want[s] for s in range(6, 13)], rtol=1e-6)


def test_evaluate_and_load_params_read_the_latest_checkpoint(reference_run):
    config, workdir, summary = reference_run
    metrics = evaluate(config, workdir, data=SyntheticData(config, 8))
    assert metrics["step"] == 12
    np.testing.assert_allclose(metrics["eval_loss"], summary["eval_loss"], rtol=1e-6)
    _, params, step = load_params(config, workdir)
    assert step == 12 and params["token_embed"].shape == (VOCAB, config.model.d_model)
    assert evaluate(config, workdir, data=SyntheticData(config, 8), step=10)["step"] == 10


def test_rsqrt_schedule_is_the_references():
    t = load_config("tiny").train
    t.update(learning_rate=2.0, warmup_steps=100)
    lr = make_schedule(t)
    # optax counts steps from 0, the reference from 1: lr(step) = peak / sqrt(max(step + 1, warmup)).
    np.testing.assert_allclose([lr(0), lr(99), lr(399)], [2.0 / 10, 2.0 / 10, 2.0 / 20], rtol=1e-6)


def test_cosine_schedule_warms_up_then_decays():
    t = load_config("tiny").train
    t.update(schedule="cosine", learning_rate=1e-3, warmup_steps=10, num_steps=110)
    lr = make_schedule(t)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(110)) == pytest.approx(1e-4)  # ends at a tenth of the peak


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_optimizers_minimise_a_quadratic(name):
    t = load_config("tiny").train
    t.update(optimizer=name, learning_rate=0.1 if name == "adamw" else 1.0, warmup_steps=1, weight_decay=0.0)
    tx = make_optimizer(t)
    params = {"w": jnp.full((4, 3), 2.0), "b": jnp.ones(3)}
    loss = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))  # noqa: E731

    @jax.jit  # one compiled program instead of one per eager optax op
    def run(params):
        def step(_, carry):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state

        return jax.lax.fori_loop(0, 30, step, (params, tx.init(params)))[0]

    assert float(loss(run(params))) < 0.5 * float(loss(params))


def test_adafactor_weight_decay_is_decoupled():
    # With a zero gradient only the decay acts: w <- w - wd * w, independent of the learning rate
    # (weight_decay_steps 0: a constant rate; its linear fall is tested in test_reference_fidelity.py).
    t = load_config("tiny").train
    t.update(weight_decay=0.1, weight_decay_steps=0, learning_rate=1.0, warmup_steps=1)
    tx = make_optimizer(t)
    params = {"w": jnp.full((2, 2), 1.0)}
    updates, _ = jax.jit(tx.update)({"w": jnp.zeros((2, 2))}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * params["w"], rtol=1e-6)
