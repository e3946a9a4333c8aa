"""Never lose a good checkpoint: divergence, a second run on the same workdir, damaged checkpoints,
a config that does not match, and SIGKILL at random moments (the resumed run's losses equal an
uninterrupted run's)."""

import contextlib
import json
import os
import pathlib
import random
import resource
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import free_port, run_cli, start_cli, watched_child
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
    assert code == 1 and "hold a model of other shapes than the config's" in err and "Nothing was changed there" in err
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


# ----------------------------------------------------------------------------- one message, nothing lost (case 6)

def mounted(kind: str, path: pathlib.Path, size_kb: int = 0) -> bool:
    """Mounts a small tmpfs at `path` ("tmpfs") or remounts `path` read-only in place ("ro"), where this
    user may (root); False where not."""
    path.mkdir(parents=True, exist_ok=True)
    commands = ({"tmpfs": [["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)]],
                 "ro": [["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]]}[kind])
    for i, command in enumerate(commands):
        if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
            if i:
                subprocess.run(["umount", str(path)], capture_output=True)
            return False
    return True


def unmount(path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only(path: pathlib.Path):
    """`path` read-only for the block: a read-only bind mount as root (permissions do not stop root), else
    the directory's write permission removed."""
    if os.geteuid() == 0:
        if not mounted("ro", path):
            pytest.skip("root without mount: cannot make a directory read-only")
        try:
            yield
        finally:
            unmount(path)
        return
    mode = path.stat().st_mode
    path.chmod(mode & ~0o222)
    try:
        yield
    finally:
        path.chmod(mode)


def test_a_full_disk_during_a_save_is_one_message_and_the_earlier_checkpoints_restore(trained, corpus, tmp_path):
    """A real full file system (a small tmpfs) where the test can mount one; else a file size limit, a write
    that really fails (EFBIG)."""
    disk = tmp_path / "disk"
    size_kb = sum(f.stat().st_size for f in trained.rglob("*") if f.is_file()) // 1024 + 500
    tmpfs = mounted("tmpfs", disk, size_kb)
    try:
        workdir = disk / "w"
        shutil.copytree(trained, workdir)
        limit = None if tmpfs else (lambda: (signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
                                             resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))))
        done = subprocess.run([sys.executable, "-m", "scaling_sparse", "train", f"--workdir={workdir}",
                               "--config.train.num_steps=60", "--config.train.checkpoint_every=1",
                               "--config.train.keep_checkpoints=100", "--config.train.progress=False"],
                              cwd=ROOT, capture_output=True, text=True, preexec_fn=limit, timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        error = re.search(r"error: saving the checkpoint at step (\d+) failed \((.*?)\)\. The checkpoints at steps "
                          r"\[.*?\] in .* are intact", done.stderr)
        assert error and (error.group(2) == "no space left on the device" or not tmpfs), done.stderr[-3000:]
        assert done.stderr.count("\n") <= 3  # the error, and at most the data line before it
        steps = steps_in(workdir)
        assert int(error.group(1)) not in steps and {10, 20} <= set(steps)
        assert not list((workdir / "checkpoints").glob("*tmp*"))  # the incomplete step was removed
        code, out, err = run_cli(None, "eval", f"--workdir={workdir}", "--json")
        assert code == 0 and json.loads(out)["step"] == steps[-1], err
    finally:
        if tmpfs:
            unmount(disk)


def test_a_full_disk_under_the_metrics_stops_tensorboard_with_a_warning_and_metrics_jsonl_with_a_message(
        tmp_path, capsys):
    """TensorBoard's event file is a convenience: its failed write is one warning and the run goes on (also at
    exit: no retry with a traceback). metrics.jsonl is the record: its failed write stops the run, saying why."""
    from scaling_sparse.metrics import MetricsWriteError, MetricsWriter

    writer = MetricsWriter(tmp_path, echo=None)
    if writer._tb is None:
        pytest.skip("tensorboardX is not installed")
    file_writers = list(writer._tb.all_writers.values())

    def full(*_):
        raise OSError(28, "No space left on device")

    writer._tb.flush = full
    writer.write(1, {"loss": 2.0})
    writer.write(2, {"loss": 1.5})
    assert capsys.readouterr().err.count("warning: TensorBoard logging stopped") == 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert all(w.event_writer._closed for w in file_writers)  # tensorboardX's exit handler writes nothing
    writer.path = tmp_path / "a_directory"
    writer.path.mkdir()
    with pytest.raises(MetricsWriteError, match=r"writing the metrics of step 3 to .*a_directory failed .*Fix: "):
        writer.write(3, {"loss": 1.0})
    writer.close()


def test_sigint_before_the_first_step_claims_no_checkpoint(trained, corpus, tmp_path, monkeypatch):
    from scaling_sparse import train as train_module

    workdir = copy_of(trained, tmp_path)
    restore = train_module._restore_or_init

    def restore_then_ctrl_c(*a, **k):
        result = restore(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the run starts: before step 21
        return result

    monkeypatch.setattr(train_module, "_restore_or_init", restore_then_ctrl_c)
    code, _, err = run_cli(None, "train", *args(workdir, corpus, "--config.train.num_steps=30"))
    assert code == 130 and "stopped by SIGINT at step 20 (before its first step; no new checkpoint, the latest is " \
        "still step 20)" in err, err
    assert steps_in(workdir) == [10, 20]


@pytest.mark.parametrize("damage", ["{bad", '{"model": 3}'])
def test_a_damaged_config_json_with_config_given_is_a_warning_and_kept(trained, corpus, tmp_path, damage):
    workdir = copy_of(trained, tmp_path)
    (workdir / "config.json").write_text(damage)
    code, _, err = run_cli(None, "eval", f"--workdir={workdir}")  # without --config: the stored one is needed
    assert code == 2 and "cannot be read as a config" in err and "Fix: pass --config=FILE" in err
    code, out, err = run_cli(None, "eval", *args(workdir, corpus))
    assert code == 0 and "warning:" in err and "cannot be read as a config" in err and "Traceback" not in err
    if damage != "{bad":
        return
    code, _, err = run_cli(None, "train", *args(workdir, corpus, "--config.train.num_steps=21",
                                                "--config.train.sample_at_end=False"))
    assert code == 0, err
    kept = list(workdir.glob("config.json.damaged-*"))
    assert len(kept) == 1 and kept[0].read_text() == damage
    assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 32


def test_config_json_edited_to_another_model_size_names_the_shapes(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    config = json.loads((workdir / "config.json").read_text())
    config["model"]["d_model"] = 64
    (workdir / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(None, "eval", f"--workdir={workdir}")
    assert code == 1 and "hold a model of other shapes than the config's" in err and "checkpoint (32," in err
    assert "strict" not in err and "Traceback" not in err and steps_in(workdir) == [10, 20]


@pytest.mark.parametrize("damage", ["truncated_model", "empty_model", "garbage_json"])
def test_a_damaged_tokenizer_is_named_and_left_as_it_is(trained, corpus, tmp_path, damage):
    workdir = copy_of(trained, tmp_path)
    model, meta = workdir / "tokenizer.model", workdir / "tokenizer.json"
    if damage == "truncated_model":
        model.write_bytes(model.read_bytes()[:100])
    elif damage == "empty_model":
        model.write_bytes(b"")
    else:
        meta.write_text("garbage{")
    before = (model.read_bytes(), meta.read_bytes())
    for command in (["generate", f"--workdir={workdir}", "--prompt=the cat"], ["train", f"--workdir={workdir}"]):
        code, _, err = run_cli(None, *command)
        assert code == 2 and "is damaged" in err and "Fix: restore" in err and "Traceback" not in err, err
    assert (model.read_bytes(), meta.read_bytes()) == before and steps_in(workdir) == [10, 20]


def test_a_truncated_data_cache_is_rebuilt_with_a_word(trained, corpus, tmp_path):
    workdir = copy_of(trained, tmp_path)
    for array in (workdir / "data_cache").glob("*.npy"):
        array.write_bytes(array.read_bytes()[:200])
    code, _, err = run_cli(None, "train", *args(workdir, corpus, "--config.train.num_steps=21",
                                                "--config.train.sample_at_end=False"))
    assert code == 0 and "is damaged" in err and "rebuilding it from the corpus" in err, err
    assert steps_in(workdir) == [10, 20, 21]
    code, _, err = run_cli(None, "eval", *args(workdir, corpus))
    assert code == 0 and "data cache" not in err  # rebuilt whole


def test_deleted_checkpoint_files_fall_back_in_one_warning(trained, tmp_path):
    """The failed restore's reads still in flight used to print dozens of tracebacks."""
    workdir = copy_of(trained, tmp_path)
    for f in (workdir / "checkpoints" / "20" / "state").glob("ocdbt.process_0/d/*"):
        f.unlink()
    done = subprocess.run([sys.executable, "-m", "scaling_sparse", "eval", f"--workdir={workdir}", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and json.loads(done.stdout)["step"] == 10
    assert "the checkpoint at step 20" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr and done.stderr.count("\n") <= 3, done.stderr[-3000:]


@pytest.mark.parametrize("flag, message", [
    ("--prompt=caf\udce9", "--prompt is not valid UTF-8 text"),
    (f"--seed={2**64 + 1}", "--seed must be an integer in [0, 2**63)"),
    ("--temperature=nan", "--temperature must be a finite number"),
    ("--prompt=" + "the cat sat " * 100, "Fix: shorten --prompt to about"),
])
def test_bad_generate_input_is_one_line(trained, flag, message):
    code, out, err = run_cli(None, "generate", f"--workdir={trained}", "--prompt=the", flag)
    assert code == 2 and message in err and "Traceback" not in err and not out, err


def test_compress_out_a_file_read_only_or_claimed_is_refused_and_leaves_nothing(trained, tmp_path):
    from scaling_sparse.compress.workdir import claim_out, partial_dir

    compress = ["compress", f"--workdir={trained}", "--method=svd", "--rank=2"]
    (tmp_path / "file").write_text("mine")
    code, _, err = run_cli(None, *compress, f"--out={tmp_path / 'file'}")
    assert code == 2 and "is an existing file" in err and (tmp_path / "file").read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        code, _, err = run_cli(None, *compress, f"--out={locked / 'new'}")
    assert code in (1, 2) and "cannot be written" in err and "Traceback" not in err, err
    out = tmp_path / "out"
    with claim_out(trained, out):  # another compress run writing the same --out
        code, _, err = run_cli(None, *compress, f"--out={out}")
        assert code == 1 and "is being written by another compress run (pid" in err, err
    assert not partial_dir(out).exists() and not out.exists()  # a run that ends without a model leaves nothing
    code, _, err = run_cli(None, *compress, f"--out={out}")
    assert code == 0 and (out / "config.json").exists() and not partial_dir(out).exists(), err


def test_workdir_and_config_mistakes_are_one_line(trained, corpus, tmp_path):
    workdir = copy_of(trained, tmp_path)
    before = sorted(p.name for p in workdir.iterdir())
    with read_only(workdir):
        code, _, err = run_cli(None, "train", *args(workdir, corpus, "--config.train.num_steps=21"))
    assert code == 1 and "cannot be written" in err and "Nothing was changed" in err, err
    assert sorted(p.name for p in workdir.iterdir()) == before and steps_in(workdir) == [10, 20]
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(None, "eval", *args(tmp_path / "file", corpus))
    assert code == 2 and "is a file, not a directory" in err
    code, out, err = run_cli(None, "eval", f"--config={workdir / 'config.json'}", f"--workdir={workdir}", "--json")
    assert code == 0 and json.loads(out)["step"] == 20, err
    (tmp_path / "no_get_config.py").write_text("x = 1\n")
    done = subprocess.run([sys.executable, "-m", "scaling_sparse", "eval", f"--config={tmp_path / 'no_get_config.py'}",
                           f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "has no get_config() function" in done.stderr, done.stderr  # (config_flags
    # caches config modules in a process: a real one, not run_cli)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    shutil.copy(workdir / "config.json", tmp_path / "empty")
    code, _, err = run_cli(None, "eval", f"--workdir={tmp_path / 'empty'}")
    assert code == 1 and "no checkpoints in" in err and "yet" in err and "model config changed" not in err, err
    code, _, err = run_cli(None, "train", *args(tmp_path / "new", corpus, "--config.train.learning_rate=inf"))
    assert code == 2 and "train.learning_rate: must be a finite number > 0, got inf" in err
    assert not (tmp_path / "new").exists()
