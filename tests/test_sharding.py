"""Sharded paths equal the unsharded ones (8 virtual CPU devices, in a subprocess: XLA_FLAGS must be
set before JAX starts), and invalid meshes are clear start-up errors."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import tiny_config, xla_flags
from scaling_sparse import sharding
from scaling_sparse.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_on_8_devices(script: str, *args) -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


MESHES = ("data=8", "fsdp=8", "tensor=2,fsdp=4", "data=2,fsdp=2,tensor=2")
# One subprocess per model (each takes minutes on two cores); every test of a model is in one xdist
# group, so one worker runs that model's subprocess once (`--dist loadgroup`, Makefile).
MODELS = [pytest.param(m, marks=pytest.mark.xdist_group(f"sharded_{m}"))
          for m in ("dense", "sparse_all", "terraformer", "encdec", "terraformer_encdec", "compressed")]


@pytest.fixture(scope="session")
def reports(tmp_path_factory):
    """model -> its sharded_equivalence.py report, run on first use. Session-scoped: a worker that runs
    other modules' tests between two of a model's (xdist schedules groups, not modules) keeps the
    report instead of running the subprocess again."""
    done = {}

    def report_of(model: str) -> dict:
        if model not in done:
            done[model] = run_on_8_devices("sharded_equivalence.py", tmp_path_factory.mktemp("sharded"), model)
        return done[model]
    return report_of


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_train_step_equals_unsharded(reports, model, mesh):
    r = reports(model)["steps"][f"{model}/{mesh}"]
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
    # Float reordering only, relative to the largest gradient (float32 sums over a different partition
    # differ by ~1e-6 of their size: 1.25e-5 at a gradient of 15 on an AMD EPYC host); the encoder-decoder
    # Terraformer chains two reversible recomputations.
    tolerance = 6e-6 if model == "terraformer_encdec" else 2e-6
    assert r["max_grad_diff"] < tolerance * max(r["grad_scale"], 1.0)
    assert r["max_param_diff"] < 1e-5


@pytest.mark.parametrize("model", MODELS)
def test_parameters_and_optimizer_state_really_are_sharded(reports, model):
    steps = reports(model)["steps"]
    for part in ("params", "opt_state"):
        fraction = {m: steps[f"{model}/{m}"]["per_device_bytes"][part] / steps[f"{model}/{m}"]["total_bytes"][part]
                    for m in MESHES}
        assert fraction["data=8"] == 1.0  # pure data parallelism replicates the state
        if part == "opt_state":
            # Adafactor's factored row/column statistics, nearly all of its state, are replicated; the full
            # second moments of 1-D parameters take their parameter's sharding (docs/semantics.md §5c).
            assert all(fraction[m] < 1.0 for m in MESHES if m != "data=8")
            continue
        # Everything with an embed axis is split 8 (or 4 x 2) ways; norms, conv kernels and the SRU stay whole.
        assert fraction["fsdp=8"] < 0.4 and fraction["tensor=2,fsdp=4"] < 0.4
        assert fraction["data=2,fsdp=2,tensor=2"] < 0.55


@pytest.mark.xdist_group("sharded_sparse_all")
def test_checkpoint_saved_on_one_mesh_restores_on_another(reports):
    for target, shards in (("data=2,fsdp=2,tensor=2", 4), ("single", 1)):
        r = reports("sparse_all")["checkpoint"][target]
        assert r["max_diff"] == 0.0 and r["params_only_diff"] == 0.0 and r["step"] == 1
        assert r["sharding_matches"] and r["embed_shards"] == shards


@pytest.mark.parametrize("model", MODELS)
def test_tensor_parallel_decoding_gives_the_unsharded_tokens(reports, model):
    tokens = reports(model)["decode"][model]
    assert tokens["sharded"] == tokens["single"]
    if model in ("sparse_all", "terraformer_encdec"):  # int8 weights (quantize.py), quantised on each mesh
        int8_tokens = reports(model)["decode_int8"][model]
        assert int8_tokens["sharded"] == int8_tokens["single"]


def test_mesh_sizes_are_checked_with_the_field_and_the_fix():
    mesh = tiny_config().mesh
    assert sharding.mesh_shape(mesh, 8) == (8, 1, 1)  # default: every device on data
    mesh.update(data=-1, fsdp=2, tensor=2)
    assert sharding.mesh_shape(mesh, 8) == (2, 2, 2)
    mesh.update(data=2, fsdp=2, tensor=1)
    with pytest.raises(ConfigError, match=r"config.mesh: data x fsdp x tensor = 2 x 2 x 1 = 4, but there are 8"):
        sharding.mesh_shape(mesh, 8)
    mesh.update(data=-1, fsdp=3)
    with pytest.raises(ConfigError, match="do not divide the 8 devices"):
        sharding.mesh_shape(mesh, 8)


def test_an_axis_that_does_not_divide_a_dimension_names_the_parameter():
    from scaling_sparse.state import model_spec
    from scaling_sparse.config import ModelConfig

    config = tiny_config(d_model=36, n_heads=4)  # 36 is not divisible by fsdp=8
    mesh = type("FakeMesh", (), {"shape": {"data": 1, "fsdp": 8, "tensor": 1}})()
    with pytest.raises(ConfigError, match=r"dimension \d \('embed', size 36\).*fsdp"):
        model_spec(ModelConfig.from_config(config.model)).shardings(mesh, sharding.logical_rules(config.mesh))


def test_batch_must_divide_over_the_batch_axes():
    config = tiny_config()
    mesh = type("FakeMesh", (), {"shape": {"data": 8, "fsdp": 1, "tensor": 1}})()
    with pytest.raises(ConfigError, match="config.train.batch_size: 4 is not divisible by the 8 devices"):
        sharding.check_batch(config.train.batch_size, mesh, sharding.logical_rules(config.mesh))


def test_sharded_memory_benchmark_reports_less_per_device_with_more_fsdp(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sharded_memory.py"), "--preset=tiny",
                           "--fsdp=1,8", f"--out={tmp_path}", "--no_plot"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "sharded_memory_cpu.json").read_text())["rows"]
    one, eight = rows
    assert one["devices"] == eight["devices"] == 8 and (one["fsdp"], eight["fsdp"]) == (1, 8)
    for r in rows:  # XLA's compiled output is the state the shardings imply
        assert r["compiled_output_bytes_per_device"] >= r["param_bytes_per_device"] + r["opt_state_bytes_per_device"]
    assert eight["param_bytes_per_device"] < 0.4 * one["param_bytes_per_device"]
    assert one["param_bytes_per_device"] == one["param_bytes_total"]
