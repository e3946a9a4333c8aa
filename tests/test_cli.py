"""The command line end to end on the tiny preset and a small text corpus made here.

train, eval and generate run through absl's flag parsing and `cli.main` in this process (one
trained workdir shared by the module); the real `python -m scaling_sparse` entry point runs as a
subprocess for --help and for a bad config (no model is built there, so it is quick).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import run_cli
from scaling_sparse.kernels import cpu as cpu_kernels
from scaling_sparse.metrics import read_metrics

# One xdist worker runs this module's tests: its module-scoped training run is then made once
# (`--dist loadgroup` otherwise schedules each test on its own).
pytestmark = pytest.mark.xdist_group("cli")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "configs", "tiny.py")


def _main(*argv) -> int:
    return run_cli(None, *argv)[0]


@pytest.fixture(scope="module")
def run_args(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    return [f"--config={TINY}", f"--workdir={workdir}", "--config.data.source=files",
            f"--config.data.path={corpus}", "--config.model.vocab_size=128"]


@pytest.fixture(scope="module")
def trained(run_args):
    code = _main("train", *run_args, "--config.train.num_steps=6", "--config.train.eval_every=3",
                 "--config.train.checkpoint_every=3", "--config.train.log_every=3")
    return code, run_args[1].split("=", 1)[1]


def test_train_writes_metrics_checkpoints_and_config(trained):
    code, workdir = trained
    assert code == 0
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [3, 6]
    assert all("train_loss" in r and "eval_loss" in r for r in records)
    assert records[-1]["eval_loss"] < records[0]["train_loss"] + 1.0
    saved = json.loads(open(os.path.join(workdir, "config.json")).read())
    assert saved["model"]["vocab_size"] == 128 and saved["data"]["source"] == "files"
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


def test_eval_reports_the_checkpoints_validation_loss(trained, run_args, capsys):
    _, workdir = trained
    code, out, _ = run_cli(capsys, "eval", *run_args, "--json")
    assert code == 0
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["step"] == 6
    assert metrics["eval_loss"] == pytest.approx(read_metrics(workdir)[-1]["eval_loss"], rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-4)


def test_generate_greedy_is_deterministic_and_sampling_runs(trained, run_args, capsys):
    args = ["generate", *run_args, "--prompt=the cat", "--max_new_tokens=8"]
    code, first, err = run_cli(capsys, *args)
    assert code == 0 and first.startswith("the cat") and "# greedy" in err  # the tiny preset's default
    # One device: the command line decodes with the compiled kernels where they are built, as the benchmark does.
    assert ("decode path: compiled CPU kernels" if cpu_kernels.available() else "decode path: JAX") in err
    assert run_cli(capsys, *args)[1] == first
    code, sampled, err = run_cli(capsys, *args, "--temperature=1.0", "--top_k=5", "--seed=3")
    assert code == 0 and sampled.startswith("the cat")
    assert "# sampled: temperature 1, top_k 5, seed 3" in err  # the settings are printed with the sample
    code, _, err = run_cli(capsys, *args, "--temperature=nan")
    assert code == 2 and "--temperature must be a finite number >= 0" in err


def test_generate_rejects_empty_and_too_long_prompts(trained, run_args, capsys):
    code, _, err = run_cli(capsys, "generate", *run_args, "--prompt=")
    assert code == 2 and "prompt is empty" in err
    code, _, err = run_cli(capsys, "generate", *run_args, "--prompt=" + "the cat sat on the mat " * 20)
    assert code == 2 and "this model reads at most 63 (model.max_len 64" in err and "Traceback" not in err
    assert "Fix: shorten --prompt" in err and "max_new_tokens" not in err  # no advice that cannot work


def test_generate_default_length_fits_max_len(trained, run_args, capsys):
    # tiny's max_len is 64, the old fixed default of --max_new_tokens: the default is now what fits.
    code, out, err = run_cli(capsys, "generate", *run_args, "--prompt=the cat")
    assert code == 0 and out.startswith("the cat"), err
    code, _, err = run_cli(capsys, "generate", *run_args, "--prompt=the cat", "--max_new_tokens=64")
    assert code == 2 and "exceeds model.max_len 64" in err and "--max_new_tokens=64" in err  # explicit: an error


def test_a_config_that_does_not_match_the_checkpoint_is_a_clear_error(trained, run_args, capsys):
    code, _, err = run_cli(capsys, "eval", *run_args, "--config.model.d_model=64")
    assert code == 2 and "model.d_model: checkpoint 32, config 64" in err


def test_bad_config_and_missing_arguments(run_args, capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *run_args, "--config.model.n_heads=5")
    assert code == 2 and "config.model.n_heads" in err and "Fix:" in err
    code, _, err = run_cli(capsys, "eval", f"--config={TINY}", f"--workdir={tmp_path}")
    assert code == 1 and "no checkpoints" in err
    code, _, err = run_cli(capsys, "train", f"--config={TINY}")
    assert code == 2 and "--workdir is required" in err
    code, _, err = run_cli(capsys, "fly", f"--config={TINY}")
    assert code == 2 and "train, eval, generate, params" in err


def test_a_wrong_mesh_is_a_start_up_error_that_writes_nothing(run_args, capsys, tmp_path):
    args = [f"--config={TINY}", f"--workdir={tmp_path / 'w'}"]
    code, _, err = run_cli(capsys, "train", *args, "--config.mesh.data=2")  # 1 CPU device here
    assert code == 2 and "config.mesh: data x fsdp x tensor = 2 x 1 x 1 = 2, but there are 1 devices" in err
    assert "Traceback" not in err and not (tmp_path / "w").exists()
    code, _, err = run_cli(capsys, "train", *args, "--config.mesh.fsdp=0")
    assert code == 2 and "config.mesh.fsdp" in err and "Fix:" in err
    code, _, err = run_cli(capsys, "generate", *run_args, "--prompt=the", "--coordinator_address=127.0.0.1:1")
    assert code == 2 and "need all three of --coordinator_address" in err


def test_eval_and_generate_pick_a_step(trained, run_args, capsys):
    code, out, _ = run_cli(capsys, "eval", *run_args, "--step=3", "--json")
    assert code == 0 and json.loads(out)["step"] == 3
    code, out, _ = run_cli(capsys, "generate", *run_args, "--prompt=the cat", "--step=3", "--max_new_tokens=4")
    assert code == 0 and out.startswith("the cat")


def test_train_passes_step_and_reports_errors_that_carry_an_exit_code(run_args, capsys, monkeypatch):
    from scaling_sparse import train as train_module

    calls = []

    def fake_train(config, workdir, *, step=None, **kwargs):
        calls.append(step)
        return {"step": step}

    monkeypatch.setattr(train_module, "train", fake_train)
    assert run_cli(capsys, "train", *run_args, "--step=3")[0] == 0
    assert run_cli(capsys, "train", *run_args)[0] == 0
    assert calls == [3, None]

    class Busy(RuntimeError):  # like train.WorkdirBusyError / checkpoint.CheckpointError
        exit_code = 75

    def busy(config, workdir, **kwargs):
        raise Busy("the workdir is in use by process 123. Fix: stop it or use another --workdir")

    monkeypatch.setattr(train_module, "train", busy)
    code, _, err = run_cli(capsys, "train", *run_args)
    assert code == 75 and err.strip() == ("error: the workdir is in use by process 123. Fix: stop it or use "
                                          "another --workdir")

    def crash(config, workdir, **kwargs):
        raise RuntimeError("a bug")  # no exit_code: a bug keeps its traceback

    monkeypatch.setattr(train_module, "train", crash)
    with pytest.raises(RuntimeError, match="a bug"):
        _main("train", *run_args)


def test_config_command_lists_every_field(capsys):
    from scaling_sparse.config import base_config

    code, out, _ = run_cli(capsys, "config", f"--config={TINY}", "--config.model.attention=lsh")
    assert code == 0
    for section, fields in base_config().to_dict().items():
        assert f"[{section}]" in out
        for field in fields:
            assert f"  {field} " in out, f"{section}.{field} is not listed"
    assert "attention          = 'lsh'            # base default 'full'; full | lsh" in out
    assert "d_model            = 32               # base default 256" in out
    code, out, _ = run_cli(capsys, "config", f"--config={TINY}", "--json")
    assert code == 0 and json.loads(out)["model"]["max_len"] == 64


def test_params_command(capsys):
    code, out, _ = run_cli(capsys, "params", f"--config={TINY}", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["total_params"] > report["params_per_token"] > 0


def _module(*argv):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "scaling_sparse", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_module_entry_point_help_and_clean_errors():
    done = _module("--help")  # absl exits with status 1 after printing the help
    for text in ("python -m scaling_sparse train", "generate", "--prompt", "--config.train.num_steps", "params",
                 "python -m scaling_sparse config --config="):
        assert text in done.stdout
    done = _module("train", f"--config={TINY}", "--workdir=unused", "--config.train.seq_len=1000")
    assert done.returncode == 2 and "config.train.seq_len" in done.stderr and "Traceback" not in done.stderr
    done = _module("train", f"--config={TINY}", "--config.model.no_such_field=1")
    assert done.returncode == 2 and "no_such_field" in done.stderr and "Traceback" not in done.stderr


def test_a_cpu_only_machine_prints_no_backend_probe_lines(tmp_path):
    # eval starts JAX's backends (distributed.initialize) before it finds no checkpoint: JAX logs every
    # backend it probes and does not find ("Unable to initialize backend 'tpu'") at absl's default INFO.
    # JAX_PLATFORMS unset, as a user has it (set, JAX probes only the platforms named).
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    done = subprocess.run([sys.executable, "-m", "scaling_sparse", "eval", f"--config={TINY}", f"--workdir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no checkpoints" in done.stderr
    assert "Unable to initialize backend" not in done.stderr and "xla_bridge" not in done.stderr, done.stderr


@pytest.mark.parametrize("field, problem", [("lsh_chunk_len=0", "must be >= 1, got 0"),
                                            ("lsh_n_buckets=3", "must be 0 (= 2 * seq_len / chunk_len), 1 or even")])
def test_a_field_a_layer_would_reject_stops_the_run_before_anything_is_written(tmp_path, field, problem):
    workdir = tmp_path / "w"
    done = _module("train", f"--config={TINY}", f"--workdir={workdir}", "--config.model.attention=lsh",
                   f"--config.model.{field}")
    assert done.returncode == 2, done.stderr
    assert f"error: config.model.{field.split('=')[0]}: {problem}" in done.stderr and "Fix:" in done.stderr
    assert "Traceback" not in done.stderr
    assert not workdir.exists()  # no config.json, no tokenizer


# Every sparsity flag and every Terraformer option, through the command line: train, checkpoint,
# resume with more steps, evaluate, generate (stdlib_sparse / terraformer_medium at tiny sizes).
SPARSE_FLAGS = ["--config.model.ff_sparsity=8", "--config.model.attn_sparsity=4", "--config.model.loss_sparsity=4"]
TERRAFORMER_FLAGS = ["--config.model.reversible=True", "--config.model.attention=lsh",
                     "--config.model.lsh_chunk_len=8", "--config.model.ff_sru_units=8"]


@pytest.mark.parametrize("extra", [SPARSE_FLAGS, SPARSE_FLAGS + TERRAFORMER_FLAGS], ids=["sparse", "terraformer"])
def test_sparse_and_terraformer_train_resume_generate(corpus, tmp_path, capsys, extra):
    args = [f"--config={TINY}", f"--workdir={tmp_path}", "--config.data.source=files",
            f"--config.data.path={corpus}", "--config.model.vocab_size=128", *extra,
            "--config.train.checkpoint_every=2", "--config.train.eval_every=2", "--config.train.log_every=2"]
    code, _, err = run_cli(capsys, "train", *args, "--config.train.num_steps=2")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    code, _, err = run_cli(capsys, "train", *args, "--config.train.num_steps=4")  # resumes at step 2
    assert code == 0, err
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [2, 4]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    code, out, err = run_cli(capsys, "eval", *args, "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["step"] == 4, err
    code, out, err = run_cli(capsys, "generate", *args, "--prompt=the dog", "--max_new_tokens=6")
    assert code == 0 and out.startswith("the dog"), err
