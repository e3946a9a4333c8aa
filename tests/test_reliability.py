"""Never lose a good checkpoint: divergence, a second run on the same workdir, damaged checkpoints,
a config that does not match, and SIGKILL at random moments (the resumed run's losses equal an
uninterrupted run's)."""

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import free_port, run_cli, start_cli
from scaling_sparse.checkpoint import SET_ASIDE_DIR
from scaling_sparse.metrics import read_metrics

# One xdist worker runs this module's tests: its module-scoped training run is then made once
# (`--dist loadgroup` otherwise schedules each test on its own).
pytestmark = pytest.mark.xdist_group("reliability")

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "experiments" / "configs" / "tiny.py"


def args(workdir, corpus, *extra):
    return [f"--config={TINY}", f"--workdir={workdir}", "--config.data.source=files", f"--config.data.path={corpus}",
            "--config.model.vocab_size=128", *extra]


def steps_in(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A workdir with good checkpoints at steps 10 and 20 (tiny: checkpoint_every 10, keep 3)."""
    workdir = tmp_path_factory.mktemp("trained")
    code, _, err = run_cli(None, "train", *args(workdir, corpus, "--config.train.sample_at_end=False"))
    assert code == 0, err
    assert steps_in(workdir) == [10, 20]
    return workdir


def copy_of(workdir, tmp_path) -> pathlib.Path:
    target = tmp_path / "copy"
    shutil.copytree(workdir, target)
    return target


def test_divergence_keeps_the_good_checkpoints_and_exits_non_zero(trained, corpus, tmp_path):
    workdir = copy_of(trained, tmp_path)
    code, _, err = run_cli(None, "train", *args(workdir, corpus, "--config.train.learning_rate=1e6",
                                                "--config.train.checkpoint_every=1", "--config.train.num_steps=60",
                                                "--config.train.keep_checkpoints=2"))
    assert code == 1 and "training diverged at step" in err and "Traceback" not in err
    assert "Fix: lower --config.train.learning_rate (now 1000000.0)" in err
    assert {10, 20} <= set(steps_in(workdir)) or 20 in steps_in(workdir)  # the resumed-from state is kept
    code, out, err = run_cli(None, "eval", *args(workdir, corpus, "--step=20", "--json"))
    assert code == 0 and np.isfinite(json.loads(out)["eval_loss"])
    # Every checkpoint the diverging run left is finite; eval of a degenerate one says so and exits 1.
    for step in steps_in(workdir):
        code, out, err = run_cli(None, "eval", *args(workdir, corpus, f"--step={step}", "--json"))
        assert (code == 0 and np.isfinite(json.loads(out)["eval_loss"])) or (
            code == 1 and "weights are degenerate" in err and "Traceback" not in err)


def test_a_second_run_on_the_same_workdir_is_refused_at_once(trained, corpus, tmp_path):
    workdir = copy_of(trained, tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.Popen([sys.executable, "-m", "scaling_sparse", "train",
                              *args(workdir, corpus, "--config.train.num_steps=100000")], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = workdir / ".lock"
        deadline = time.time() + 120
        while time.time() < deadline and str(first.pid) not in (lock.read_text() if lock.exists() else ""):
            time.sleep(0.2)
        assert str(first.pid) in lock.read_text()
        start = time.time()
        code, _, err = run_cli(None, "train", *args(workdir, corpus, "--config.train.num_steps=30"))
        assert code == 1 and f"in use by another training run (pid {first.pid}" in err and "Traceback" not in err
        assert time.time() - start < 30
    finally:
        first.kill()
        first.wait()
    # SIGKILL released the lock: the next run goes ahead.
    code, _, err = run_cli(None, "train", *args(workdir, corpus, "--config.train.num_steps=21",
                                                "--config.train.sample_at_end=False"))
    assert code == 0, err


def damage(workdir, how: str) -> None:
    step_dir = workdir / "checkpoints" / "20"
    if how == "overwritten_file":
        files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and "metadata" not in f.name.lower()
                 and f.stat().st_size > 0]
        for f in files:
            f.write_bytes(os.urandom(f.stat().st_size))
    elif how == "garbled_metadata":
        for f in step_dir.rglob("*METADATA*"):
            f.write_text("{not json")
    elif how == "empty_step":
        (workdir / "checkpoints" / "30").mkdir()


@pytest.mark.parametrize("how", ["overwritten_file", "garbled_metadata", "empty_step"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_message(trained, corpus, tmp_path, how):
    workdir = copy_of(trained, tmp_path)
    damage(workdir, how)
    bad = 30 if how == "empty_step" else 20
    good = 20 if how == "empty_step" else 10
    code, out, err = run_cli(None, "generate", *args(workdir, corpus, "--prompt=the cat", "--max_new_tokens=4"))
    assert code == 0 and out.startswith("the cat")  # the warning goes to stderr, the text alone to stdout
    assert f"the checkpoint at step {bad} in" in err and "cannot be read" in err and "Traceback" not in err
    if how != "overwritten_file":
        return
    code, out, _ = run_cli(None, "eval", *args(workdir, corpus, "--json"))
    assert code == 0 and json.loads(out)["step"] == good
    code, _, err = run_cli(None, "eval", *args(workdir, corpus, f"--step={bad}"))
    assert code == 1 and "no readable checkpoint" in err
    assert steps_in(workdir) == [10, 20]  # readers never move or delete anything
    code, out, err = run_cli(None, "train", *args(workdir, corpus, "--config.train.num_steps=25",
                                                  "--config.train.sample_at_end=False"))
    assert code == 0 and f"resumed from the checkpoint at step {good}" in out + err
    aside = list((workdir / SET_ASIDE_DIR).iterdir())
    assert [p.name.split("-")[:2] for p in aside] == [["20", "unreadable"]]  # kept, not deleted
    assert steps_in(workdir) == [10, 20, 25]


def test_train_step_flag_resumes_from_an_older_checkpoint(trained, corpus, tmp_path):
    workdir = copy_of(trained, tmp_path)
    code, out, err = run_cli(None, "train", *args(workdir, corpus, "--step=10", "--config.train.num_steps=12",
                                                  "--config.train.sample_at_end=False"))
    assert code == 0 and "resumed from the checkpoint at step 10" in out + err
    assert "superseded" in out + err and steps_in(workdir) == [10, 12]
    code, _, err = run_cli(None, "train", *args(workdir, corpus, "--step=7"))
    assert code == 1 and "no checkpoint at step 7" in err


def test_a_mismatched_config_without_config_json_writes_nothing(trained, corpus, tmp_path):
    workdir = copy_of(trained, tmp_path)
    (workdir / "config.json").unlink()
    code, _, err = run_cli(None, "train", *args(workdir, corpus, "--config.model.d_model=64",
                                                "--config.train.num_steps=30"))
    assert code == 1 and "no readable checkpoint" in err and "Nothing was changed there" in err
    assert not (workdir / "config.json").exists() and steps_in(workdir) == [10, 20]
    code, _, err = run_cli(None, "train", *args(workdir, corpus, "--config.train.num_steps=21",
                                                "--config.train.sample_at_end=False"))
    assert code == 0, err
    assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 32


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_losses(trained, corpus, tmp_path):
    """Kills a training subprocess 3 times at random moments (during start-up, and a random few
    milliseconds after a random step was logged: inside steps and inside the checkpoint saves that
    follow every second step), then lets it finish: the losses equal an uninterrupted run's."""
    tokenizer = trained / "tokenizer.model"
    common = ["--config.train.num_steps=24", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
              "--config.train.eval_every=24", "--config.train.sample_at_end=False",
              f"--config.data.tokenizer_path={tokenizer}"]
    reference = tmp_path / "reference"
    code, _, err = run_cli(None, "train", *args(reference, corpus, *common))
    assert code == 0, err
    workdir = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    rng = random.Random(0)
    kills = []
    for target in (0, rng.randint(3, 9), rng.randint(12, 20)):  # 0 = during start-up
        proc = subprocess.Popen([sys.executable, "-m", "scaling_sparse", "train", *args(workdir, corpus, *common)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline:
            logged = max([r["step"] for r in read_metrics(workdir)] or [0]) if (workdir / "metrics.jsonl").exists() else 0
            if (target == 0 and (workdir / ".lock").exists()) or (target and logged >= target):
                time.sleep(rng.uniform(0.0, 0.05))
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append(target)
        proc.wait()
    assert len(kills) == 3, kills
    code, _, err = run_cli(None, "train", *args(workdir, corpus, *common))
    assert code == 0, err
    want, got = read_metrics(reference), read_metrics(workdir)
    assert [r["step"] for r in got] == list(range(1, 25))
    np.testing.assert_allclose([r["train_loss"] for r in got], [r["train_loss"] for r in want], rtol=1e-5)
    np.testing.assert_allclose(got[-1]["eval_loss"], want[-1]["eval_loss"], rtol=1e-5)


def test_a_failed_first_run_leaves_no_tokenizer_and_a_foreign_one_is_refused(corpus, tmp_path):
    texts, workdir = tmp_path / "texts", tmp_path / "w"
    texts.mkdir()
    (texts / "a.txt").write_text("hi\n")
    run = ["train", *args(workdir, texts, "--config.train.num_steps=1")]
    code, _, err = run_cli(None, *run)
    assert code == 2 and "training split has" in err and "Traceback" not in err
    assert not (workdir / "tokenizer.model").exists()  # trained on "hi": the next run must not trust it
    # What earlier versions left behind: a 7-piece tokenizer trained on "hi", stored for this data config.
    from scaling_sparse.config import load_config
    from scaling_sparse.data.tokenizer import cached_or_trained, tokenizer_request

    config = load_config("tiny")
    config.model.vocab_size, config.data.source, config.data.path = 128, "files", str(texts)
    cached_or_trained(workdir, tokenizer_request(config), 128, config.data.tokenizer_train_chars, lambda: ["hi"])
    shutil.copytree(corpus, texts, dirs_exist_ok=True)  # the user adds real text
    code, _, err = run_cli(None, *run)
    assert code == 2 and "as <unk> (0% when it was trained): it was trained on other text" in err, err
    assert "Fix: delete" in err
    assert (workdir / "tokenizer.model").exists()  # not ours to delete: the message says what to do


# ----------------------------------------------------------------------------- several processes (issue cases 1, 7)

def two_process_args(workdir, corpus, tokenizer, num_steps, *extra):
    return ["train", *args(workdir, corpus, f"--config.train.num_steps={num_steps}", "--config.train.batch_size=8",
                           "--config.train.log_every=1", "--config.train.eval_every=1000",
                           "--config.train.checkpoint_every=1000", "--config.train.sample_at_end=False",
                           "--config.train.progress=False", f"--config.data.tokenizer_path={tokenizer}", *extra)]


def start_two(workdir, corpus, tokenizer, num_steps, *extra):
    port = free_port()
    return [start_cli(*two_process_args(workdir, corpus, tokenizer, num_steps, *extra), process=(port, i, 2))
            for i in range(2)]


def wait_for_step(workdir, procs, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (workdir / "metrics.jsonl").exists() and len(read_metrics(workdir)) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached: {[p.poll() for p in procs]}")


def finish(procs, timeout=120):
    return [(p.wait(timeout=timeout), *p.communicate()) for p in procs]


def watched_child(pid: int) -> int:
    """The JAX process a multi-process command's watcher (process_watch.py) started."""
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            return int(stat.parent.name)
    raise AssertionError(f"no child of {pid}")


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_then_a_dead_peer_is_one_message(
        trained, corpus, tmp_path):
    """Case 1: a preempted host gets SIGTERM alone; both processes save the same step and exit 143, and
    resume. Case 7: a peer killed outright ends the other with one message; the checkpoint restores."""
    workdir, tokenizer = tmp_path / "w", trained / "tokenizer.model"
    procs = start_two(workdir, corpus, tokenizer, 100000)
    wait_for_step(workdir, procs, 3)
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs)
    stopped = [re.search(r"stopped by SIGTERM at step (\d+) \(checkpoint saved at step (\d+)\)", err) for _, _, err in results]
    assert [code for code, _, _ in results] == [143, 143] and all(stopped), results
    step = int(stopped[0].group(1))
    assert {int(m.group(1)) for m in stopped} | {int(m.group(2)) for m in stopped} == {step}
    assert steps_in(workdir) == [step]

    procs = start_two(workdir, corpus, tokenizer, 100000)  # resumes; then process 1's JAX process is killed
    wait_for_step(workdir, procs, step + 2)
    os.kill(watched_child(procs[1].pid), signal.SIGKILL)
    (code0, out0, err0), (code1, _, err1) = finish(procs, timeout=60)
    assert f"resumed from the checkpoint at step {step}" in out0
    assert code0 == 1 and "error: process 0" in err0 and "Fix: start every process again" in err0, err0
    assert code1 == 128 + signal.SIGKILL
    for err in (err0, err1):
        assert "Traceback" not in err and "Check failure" not in err and "Fatal Python error" not in err, err
    assert steps_in(workdir) == [step]
    code, out, err = run_cli(None, "eval", f"--workdir={workdir}", "--json")
    assert code == 0 and json.loads(out)["step"] == step, err


def test_a_process_that_never_joins_is_named_after_the_init_timeout(corpus, tmp_path):
    """Case 7: process 0 alone, and process 1 alone (no coordinator), each with a 3 s wait."""
    tokenizer = tmp_path / "none.model"  # never read: the runtime gives up first
    procs = [start_cli(*two_process_args(tmp_path / f"w{i}", corpus, tokenizer, 10, "--distributed_init_timeout=3"),
                       process=(free_port(), i, 2)) for i in range(2)]
    (code0, _, err0), (code1, _, err1) = finish(procs)
    assert code0 == 1 and "process 1 did not connect to this coordinator" in err0, err0
    assert code1 == 1 and "process 0 (the coordinator at 127.0.0.1:" in err1 and "is not running" in err1, err1
    for err in (err0, err1):
        assert "--distributed_init_timeout=3 s" in err and "Traceback" not in err and "Check failure" not in err
    assert not (tmp_path / "w0" / "checkpoints").exists()
