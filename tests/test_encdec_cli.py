"""The encoder-decoder from the command line, as issue 13 asks: `train` on the embedded corpus with
T5 span corruption (loss falls), `eval` reproduces the run's last validation loss, `generate`
decodes from a prompt given as the encoder input; the Terraformer variant trains too."""

import json
import os

import pytest

from conftest import run_cli
from scaling_sparse.metrics import read_metrics

# One xdist worker runs this module's tests: its module-scoped training run is then made once
# (`--dist loadgroup` otherwise schedules each test on its own).
pytestmark = pytest.mark.xdist_group("encdec_cli")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "configs", "tiny.py")
ENCDEC = ["--config.model.arch=encdec", "--config.data.objective=span_corruption", "--config.model.ff_sparsity=8",
          "--config.model.attn_sparsity=4", "--config.model.loss_sparsity=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("encdec")
    args = [f"--config={TINY}", f"--workdir={workdir}", *ENCDEC]
    code, _, _ = run_cli(None, "train", *args, "--config.train.num_steps=60", "--config.train.eval_every=20",
                         "--config.train.log_every=20", "--config.train.checkpoint_every=60")
    return code, args, str(workdir)


def test_train_on_the_embedded_corpus_lowers_the_loss(trained):
    code, _, workdir = trained
    assert code == 0
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [20, 40, 60]
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    saved = json.loads(open(os.path.join(workdir, "config.json")).read())
    assert saved["model"]["arch"] == "encdec" and saved["data"]["objective"] == "span_corruption"


def test_eval_and_generate(trained, capsys):
    _, args, workdir = trained
    code, out, _ = run_cli(capsys, "eval", *args, "--json")
    assert code == 0
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["step"] == 60
    assert metrics["eval_loss"] == pytest.approx(read_metrics(workdir)[-1]["eval_loss"], rel=1e-5)
    code, out, _ = run_cli(capsys, "generate", *args, "--prompt=import os<extra_id_0> sys", "--max_new_tokens=8")
    assert code == 0 and out.strip()


def test_terraformer_encoder_decoder_trains(tmp_path, capsys):
    args = [f"--config={TINY}", f"--workdir={tmp_path}", *ENCDEC, "--config.model.reversible=True",
            "--config.model.ff_sru_units=8"]
    code, _, _ = run_cli(capsys, "train", *args, "--config.train.num_steps=20", "--config.train.eval_every=10",
                         "--config.train.log_every=10", "--config.train.checkpoint_every=20")
    assert code == 0
    records = read_metrics(str(tmp_path))
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    code, out, _ = run_cli(capsys, "generate", *args, "--prompt=def main", "--max_new_tokens=4")
    assert code == 0
