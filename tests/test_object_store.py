"""Work directories on object storage (gs://; scaling_sparse/storage.py, docs/storage.md) against a real GCS
server on loopback (tests/gcs_server.py, started here): 2 processes x 4 virtual devices train into a
bucket, are SIGKILLed, resume (the dead run's lease refuses a plain restart and is taken over on request)
with the losses of an uninterrupted local-disk run; eval and generate read the bucket; a damaged newest
checkpoint there falls back and is set aside as on local disk; the lease refuses a second holder, is taken
over when stale, and its old holder learns it lost it."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gcs_server
from conftest import free_port, run_cli, start_cli, watched_child
from scaling_sparse import storage
from scaling_sparse.checkpoint import Checkpointer
from scaling_sparse.metrics import read_metrics

pytestmark = pytest.mark.xdist_group("object_store")  # one server for the module

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "experiments" / "configs" / "tiny.py"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """gs://bucket on a fresh in-memory server; this process and every subprocess find it by environment."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).with_name("gcs_server.py")), str(port),
                               "bucket"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    import select

    assert select.select([server.stdout], [], [], 60)[0], "the GCS server did not start within 60 s"
    assert server.stdout.readline().strip() == "ready"
    env = {**gcs_server.environment(port), "SCALING_SPARSE_CACHE": str(tmp_path_factory.mktemp("cache"))}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield "gs://bucket"
    for k, v in before.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.kill()
    server.wait()


def args(workdir, corpus, *extra):
    return [f"--config={TINY}", f"--workdir={workdir}", "--config.data.source=files", f"--config.data.path={corpus}",
            "--config.model.vocab_size=128", "--config.train.batch_size=8", "--config.train.log_every=1",
            "--config.train.eval_every=15", "--config.train.checkpoint_every=3", "--config.train.sample_at_end=False",
            "--config.train.progress=False", *extra]


def finish(proc) -> tuple[int, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out + err


def test_a_run_in_a_bucket_killed_and_resumed_gives_the_local_disk_losses_evaluates_and_generates(
        bucket, corpus, tmp_path, monkeypatch):
    reference = tmp_path / "local"
    code, out = finish(start_cli("train", *args(reference, corpus, "--config.train.num_steps=15")))
    assert code == 0, out[-3000:]
    tokenizer = f"--config.data.tokenizer_path={reference / 'tokenizer.model'}"

    run = f"{bucket}/runs/tiny"
    port = free_port()
    procs = [start_cli("train", *args(run, corpus, "--config.train.num_steps=1000", tokenizer), devices=4,
                       process=(port, i, 2)) for i in range(2)]  # killed long before its end
    deadline, logged = time.time() + 300, 0
    while time.time() < deadline and all(p.poll() is None for p in procs) and logged < 4:
        logged = max([r["step"] for r in read_metrics(run)] or [0])  # past the checkpoint at step 3 at 4
        time.sleep(0.2)
    assert all(p.poll() is None for p in procs), [finish(p)[1][-3000:] for p in procs]
    assert logged >= 4, f"the bucket run logged {logged} steps in 300 s"
    for p in procs:  # the JAX processes, not their watchers (which would stop them gracefully: process_watch.py)
        os.kill(watched_child(p.pid), signal.SIGKILL)
    for p in procs:
        p.wait()
    assert storage.path(f"{run}/.lease").exists()  # a killed run leaves its lease
    saved = sorted(int(p.name) for p in storage.path(f"{run}/checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 15, saved

    # In this process from here on (one device: the global batch is the same).
    code, out, err = run_cli(None, "train", *args(run, corpus, "--config.train.num_steps=15", tokenizer))
    assert code == 1 and "in use by another training run" in err and "take_over_lease=True" in err, err
    code, out, err = run_cli(None, "train", *args(run, corpus, "--config.train.num_steps=15", tokenizer,
                                                  "--config.train.take_over_lease=True"))
    assert code == 0 and "taking over the lease" in err and "resumed from the checkpoint at step" in out, err
    assert not storage.path(f"{run}/.lease").exists()  # released at the end

    want = {r["step"]: r for r in read_metrics(reference)}
    got = {r["step"]: r for r in read_metrics(run)}
    assert sorted(got) == list(range(1, 16))
    np.testing.assert_allclose([got[s]["train_loss"] for s in range(1, 16)],
                               [want[s]["train_loss"] for s in range(1, 16)], rtol=1e-4)
    files = {p.name for p in storage.path(run).iterdir()}
    assert {"config.json", "metrics.jsonl", "tensorboard", "checkpoints"} <= files, files

    code, out, err = run_cli(None, "eval", f"--workdir={run}", "--json")
    assert code == 0, err
    assert '"step": 15' in out
    np.testing.assert_allclose(float(out.split('"eval_loss": ')[1].split(",")[0]), want[15]["eval_loss"], rtol=1e-5)
    code, out, err = run_cli(None, "generate", f"--workdir={run}", "--prompt=the cat", "--max_new_tokens=4")
    assert code == 0 and out.startswith("the cat"), err

    # The token caches are in the bucket too: a host with an empty disk copies them instead of tokenizing.
    from scaling_sparse.config import validate
    from scaling_sparse.data.pipeline import build_data
    from scaling_sparse.stored_config import get_config

    assert any(p.name.endswith(".train.npy") for p in storage.path(f"{run}/data_cache").iterdir())
    monkeypatch.setenv("SCALING_SPARSE_CACHE", str(tmp_path / "another_host"))
    assert build_data(validate(get_config(run)), run).stats["cache_hit"]
    assert list((tmp_path / "another_host").rglob("*.train.npy"))

    # A damaged newest checkpoint: eval falls back to the one before; set aside as a resumed run does (kept).
    storage.path(f"{run}/checkpoints/15/state/manifest.ocdbt").write_bytes(b"not a manifest")
    code, out, err = run_cli(None, "eval", f"--workdir={run}", "--json")
    assert code == 0 and '"step": 12' in out and "cannot be read" in err, err
    with Checkpointer(run) as ckpt:
        ckpt.set_aside([15], "unreadable", echo=lambda s: None)
        assert ckpt.all_steps() == [9, 12]
    aside = storage.path(f"{run}/checkpoints_set_aside")
    [moved] = [p for p in aside.iterdir()]
    assert moved.name.startswith("15-unreadable-") and (moved / "state" / "manifest.ocdbt").read_bytes() == b"not a manifest"


def test_the_lease_refuses_a_second_run_is_taken_over_when_stale_and_its_holder_learns_it_lost_it(bucket):
    import threading

    from scaling_sparse.workdir_lease import LeaseLostError, WorkdirLease
    from scaling_sparse.workdir_lock import WorkdirBusyError

    workdir, lease = f"{bucket}/lease-test", storage.path(f"{bucket}/lease-test/.lease")
    first = WorkdirLease(workdir, renew_s=0.05)
    first.acquire()
    with pytest.raises(WorkdirBusyError, match="in use by another training run .*renewed .* s ago"):
        WorkdirLease(workdir).acquire()
    first._stop.set()  # the holder hangs: no more renewals
    first._thread.join()
    second = WorkdirLease(workdir, stale_s=0.0)  # everything is stale to it
    second.acquire()
    first._stop.clear()  # the old holder wakes up: its renewal's precondition fails, it stops renewing
    first._thread = threading.Thread(target=first._renew_loop, daemon=True)
    first._thread.start()
    first._thread.join(timeout=60)
    with pytest.raises(LeaseLostError, match="another run took over the lease"):
        first.check()
    first.release()
    assert lease.exists()  # the old holder did not delete the new one's lease
    second.release()
    assert not lease.exists()

    # A holder that cannot renew stops itself before another run may take its lease over.
    cut_off = WorkdirLease(workdir, renew_s=3600, stale_s=0.2)
    cut_off.acquire()
    time.sleep(0.15)
    with pytest.raises(LeaseLostError, match="could not be renewed"):
        cut_off.check()
    cut_off.release()


def test_an_s3_workdir_is_refused_with_the_reason_and_what_to_do_instead(tmp_path):
    code, _, err = run_cli(None, "train", f"--config={TINY}", "--workdir=s3://bucket/run", "--config.train.num_steps=1")
    assert code == 2 and "work directories on S3 are not supported yet" in err and "use a gs:// bucket" in err, err
    assert "Traceback" not in err


def test_commands_that_need_a_local_workdir_say_so_for_a_bucket(bucket):
    for argv in (["datastore", f"--workdir={bucket}/x"], ["eval", f"--workdir={bucket}/x", "--datastore"],
                 ["compress", f"--config={TINY}", f"--workdir={bucket}/x", f"--out={bucket}/y", "--method=svd",
                  "--keep=0.5"]):
        code, _, err = run_cli(None, *argv, *([f"--config={TINY}"] if "--config" not in " ".join(argv) else []))
        assert code == 2 and "works on a local work directory only" in err and "gcloud storage cp -r" in err, err
