"""Several processes, one run: 2 local processes with 4 virtual CPU devices each (JAX's CPU
collectives over a localhost coordinator) train, checkpoint, stop, resume, and see the losses of a
1-process run with the same global batch."""

import pathlib
import subprocess

import numpy as np

from conftest import free_port, start_cli
from scaling_sparse.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "experiments" / "configs" / "tiny.py"


def cli(*args, devices: int = 1, process: tuple | None = None) -> subprocess.Popen:
    return start_cli("train", *args, devices=devices, process=process)


def wait(procs) -> None:
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"


def args(workdir, corpus, num_steps, tokenizer=None):
    a = [f"--config={TINY}", f"--workdir={workdir}", "--config.data.source=files", f"--config.data.path={corpus}",
         "--config.model.vocab_size=128", "--config.train.batch_size=8", f"--config.train.num_steps={num_steps}",
         "--config.train.log_every=1", "--config.train.eval_every=5", "--config.train.checkpoint_every=3",
         "--config.train.sample_at_end=False"]
    return a + ([f"--config.data.tokenizer_path={tokenizer}"] if tokenizer else [])


def losses(workdir):
    return {r["step"]: r["train_loss"] for r in read_metrics(workdir)}


def test_two_processes_train_stop_resume_and_match_one_process(corpus, tmp_path):
    reference = tmp_path / "one_process"
    wait([cli(*args(reference, corpus, 10))])  # also trains the tokenizer both runs share
    tokenizer = reference / "tokenizer.model"

    multi = tmp_path / "two_processes"
    for num_steps in (6, 10):  # stopped at step 6 (checkpoints 3 and 6), then resumed to 10
        port = free_port()
        wait([cli(*args(multi, corpus, num_steps, tokenizer), devices=4, process=(port, i, 2)) for i in range(2)])
        if num_steps == 6:
            assert sorted(losses(multi)) == list(range(1, 7))
            assert (multi / "checkpoints" / "6").is_dir()

    want, got = losses(reference), losses(multi)
    assert sorted(got) == list(range(1, 11))  # only process 0 writes metrics: each step once
    np.testing.assert_allclose([got[s] for s in range(1, 11)], [want[s] for s in range(1, 11)], rtol=1e-4)
    eval_steps = [r["step"] for r in read_metrics(multi) if "eval_loss" in r]
    assert eval_steps == [5, 6, 10]  # every eval_every steps, and at the end of each invocation
