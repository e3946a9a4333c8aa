"""A workdir records its config: commands given --workdir and no --config use WORKDIR/config.json
(scaling_sparse/stored_config.py, cli.py); and compress's flag checks. Commands on trained and
compressed workdirs are run in tests/test_compare_methods.py."""

import json
import os
import subprocess
import sys

import pytest

from scaling_sparse.checkpoint import save_config
from scaling_sparse.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "scaling_sparse", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def workdir(tmp_path):
    config = load_config("tiny")
    config.model.d_model = 48
    (tmp_path / "w").mkdir()
    save_config(config, tmp_path / "w")
    return tmp_path / "w"  # beside tmp_path / "out": a compress --out inside the source is refused


def test_the_stored_config_is_used_and_overrides_apply(workdir):
    done = cli("config", f"--workdir={workdir}", "--config.train.num_steps=7", "--json")
    assert done.returncode == 0, done.stderr
    values = json.loads(done.stdout)
    assert values["model"]["d_model"] == 48 and values["train"]["num_steps"] == 7
    params = cli("params", f"--workdir={workdir}", "--json")
    assert params.returncode == 0 and json.loads(params.stdout)["config"] == workdir.name
    assert json.loads(params.stdout)["sizes"]["d_model"] == 48


def test_no_config_anywhere_names_both_fixes(tmp_path):
    done = cli("eval", f"--workdir={tmp_path / 'none'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--config=FILE" in done.stderr and "config.json" in done.stderr
    assert not (tmp_path / "none").exists()


def test_a_damaged_config_json_is_reported_and_left_alone(workdir):
    (workdir / "config.json").write_text('{"model": {"d_model": 4')
    done = cli("generate", f"--workdir={workdir}", "--prompt=x")
    assert done.returncode == 2 and "cannot be read as a config" in done.stderr and "Traceback" not in done.stderr
    assert (workdir / "config.json").read_text() == '{"model": {"d_model": 4'


@pytest.mark.parametrize("flags, message", [
    (["--method=svd"], "--out=NEW"),
    (["--method=svd", "--out=OUT"], "exactly one of --rank=R or --keep=F"),
    (["--method=svd", "--out=OUT", "--keep=1.5"], "--keep must be in (0, 1]"),
    (["--method=cofi", "--out=OUT", "--rank=4"], "--rank and --keep are for svd / asvd"),
    (["--method=cofi", "--out=OUT", "--target_sparsity=1.0"], "--target_sparsity must be in [0, 1)"),
    (["--method=asvd", "--out=SAME", "--keep=0.5"], "same directory as --workdir"),
    (["--out=OUT", "--keep=0.5"], "--method=svd | asvd | cofi"),
])
def test_compress_flags_are_checked_before_anything_is_read(workdir, tmp_path, flags, message):
    flags = [f.replace("OUT", str(tmp_path / "out")).replace("SAME", str(workdir)) for f in flags]
    done = cli("compress", f"--workdir={workdir}", *flags)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_compress_refuses_an_out_that_holds_files(workdir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    done = cli("compress", f"--workdir={workdir}", f"--out={tmp_path / 'out'}", "--method=svd", "--rank=2")
    assert done.returncode == 2 and "already holds files" in done.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("inside", ["checkpoints/99", "compressed"])
def test_compress_refuses_an_out_inside_the_source_workdir(tmp_path, inside):
    # The next `train` on the source would move checkpoints/99 aside as an unreadable checkpoint.
    from scaling_sparse.checkpoint import CheckpointError
    from scaling_sparse.compress.workdir import check_out

    with pytest.raises(CheckpointError, match="is inside the source workdir .* Fix: give a directory outside it"):
        check_out(tmp_path / "w", tmp_path / "w" / inside)
