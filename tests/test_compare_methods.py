"""benchmarks/compare_methods.py end to end on the tiny preset (--quick), through the user's commands:
a dense and a sparse run trained, `compress` with svd, asvd and cofi from the dense workdir; then
every compressed workdir taken by `eval`, `generate` and `params` without --config (issue 16)."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import compare_methods

# One xdist worker runs this module's tests: its module-scoped training run is then made once
# (`--dist loadgroup` otherwise schedules each test on its own).
pytestmark = pytest.mark.xdist_group("compare_methods")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    out = root / "results"
    compare_methods.main(["--quick", f"--root={root / 'workdirs'}", f"--out_dir={out}", "--steps=6",
                          "--cofi_steps=3", "--tokens=4", "--repeats=1"])
    return root, json.loads((out / "compression_cpu_quick.json").read_text())


def cli(*args):
    return subprocess.run([sys.executable, "-m", "scaling_sparse", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_every_method_is_measured_with_fewer_parameters_than_dense(run):
    root, result = run
    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == {"dense", "sparse_all", "svd_keep0.5", "asvd_keep0.5", "cofi_0.5", "dense_int8",
                         "sparse_all_int8"}
    dense = rows["dense"]
    for name, r in rows.items():
        assert r["eval_loss"] > 0 and r["ms_per_token"] > 0 and len(r["ms_per_token_repeats"]) == 1
        if name.endswith("_int8"):  # the same parameters as its source, a quarter of the bytes (and scales)
            source = rows[name.removesuffix("_int8")]
            assert r["params_per_token"] == source["params_per_token"]
            assert r["bytes_per_token"] < 0.3 * source["bytes_per_token"], name
            assert abs(r["eval_loss"] - source["eval_loss"]) < 0.01 * source["eval_loss"], name
        elif name != "dense":
            assert r["params_per_token"] < dense["params_per_token"], name
    assert rows["cofi_0.5"]["extra_steps"] == 3 and rows["svd_keep0.5"]["extra_steps"] == 0
    assert rows["cofi_0.5"]["training_steps"] == dense["training_steps"] + 3
    assert any(r["on_frontier"] for r in rows.values())
    assert (root / "results" / "compression_cpu_quick.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["svd_keep0.5", "asvd_keep0.5", "cofi_0.5", "sparse_all_int8"])
def test_compressed_workdirs_work_without_a_config(run, name):
    root, result = run
    workdir = root / "workdirs" / name
    dense = next(r for r in result["results"] if r["name"] == "dense")
    params = cli("params", f"--workdir={workdir}", "--json")
    assert params.returncode == 0, params.stderr
    assert json.loads(params.stdout)["bytes_per_token"] < dense["bytes_per_token"]
    evaluated = cli("eval", f"--workdir={workdir}", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    row = next(r for r in result["results"] if r["name"] == name)
    assert json.loads(evaluated.stdout)["eval_loss"] == pytest.approx(row["eval_loss"], rel=1e-5)
    generated = cli("generate", f"--workdir={workdir}", "--prompt=def ", "--max_new_tokens=4")
    assert generated.returncode == 0 and generated.stdout.startswith("def "), generated.stderr


def test_frontier_and_budget_bookkeeping():
    rows = [dict(name="a", family="dense", ms_per_token=10.0, eval_loss=4.0),
            dict(name="b", family="svd", ms_per_token=5.0, eval_loss=4.5),
            dict(name="c", family="svd", ms_per_token=6.0, eval_loss=4.6),  # slower and worse than b
            dict(name="d", family="cofi", ms_per_token=4.0, eval_loss=5.0)]
    compare_methods.mark_frontier(rows)
    assert [r["on_frontier"] for r in rows] == [True, True, False, True]
    budgets = compare_methods.best_by_budget(rows)
    assert [(b["budget_ms_per_token"], b["best"]) for b in budgets] == [(4.0, "d"), (5.0, "b"), (10.0, "a")]


def test_unknown_entry_names_are_refused():
    with pytest.raises(SystemExit, match="unknown entries"):
        compare_methods.main(["--quick", "--only=nope"])
