"""Checkpoints: keep the last N, survive a crashed save, refuse a config whose model doesn't fit."""

import json

import numpy as np
import pytest

from scaling_sparse.checkpoint import (CHECKPOINT_DIR, Checkpointer, check_compatible, load_saved_config,
                                       save_config)
from scaling_sparse.config import ConfigError, load_config


def _state(step: int) -> dict:
    # The same kinds of leaves the trainer saves: nested params (int keys), a scalar step, a key.
    return {"params": {"layers": {0: {"w": np.full((3, 2), float(step), np.float32)}}, "b": np.arange(4.0)},
            "step": np.int32(step), "rng": np.array([0, step], np.uint32)}


def _save_steps(workdir, steps, keep=3):
    with Checkpointer(workdir, keep=keep) as ckpt:
        for step in steps:
            ckpt.save(step, _state(step), {"epoch": 0, "position": step})


def test_keeps_the_last_n_and_restores_the_latest(tmp_path):
    _save_steps(tmp_path, [1, 2, 3, 4], keep=2)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.all_steps() == [3, 4]
        state, data_state = ckpt.restore(_state(0))
    assert int(state["step"]) == 4 and data_state == {"epoch": 0, "position": 4}
    np.testing.assert_array_equal(state["params"]["layers"][0]["w"], np.full((3, 2), 4.0))
    np.testing.assert_array_equal(state["rng"], [0, 4])


@pytest.mark.parametrize("tmp_name", ["30.orbax-checkpoint-tmp", "30.orbax-checkpoint-tmp-1795425663"])
def test_an_interrupted_save_leaves_the_previous_checkpoint_restorable(tmp_path, tmp_name):
    _save_steps(tmp_path, [10, 20])
    # What a process killed in the middle of saving step 30 leaves: orbax's temporary directory
    # (named as this and older orbax versions name it) holding part of the arrays. The step is
    # renamed to `30` only once everything is written.
    partial = tmp_path / CHECKPOINT_DIR / tmp_name
    (partial / "state.orbax-checkpoint-tmp").mkdir(parents=True)
    (partial / "state.orbax-checkpoint-tmp" / "manifest.ocdbt").write_bytes(b"\x00" * 17)
    with Checkpointer(tmp_path, read_only=True) as reader:
        assert reader.latest_step() == 20
        state, data_state = reader.restore(_state(0))
    assert int(state["step"]) == 20 and data_state["position"] == 20
    assert partial.exists(), "a reader must not modify the workdir"
    # The next training run removes the leftover and can save that step again.
    with Checkpointer(tmp_path) as writer:
        writer.save(30, _state(30), {"position": 30})
        assert writer.all_steps() == [10, 20, 30]
    assert not partial.exists()
    with Checkpointer(tmp_path, read_only=True) as reader:
        assert int(reader.restore(_state(0))[0]["step"]) == 30


def test_restore_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        Checkpointer(tmp_path / "nowhere", read_only=True)


def test_saved_config_round_trips_and_guards_the_model_shape(tmp_path):
    config = load_config("tiny")
    save_config(config, tmp_path)
    assert load_saved_config(tmp_path).model.d_model == config.model.d_model
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == config.train.num_steps

    check_compatible(config, tmp_path)  # same config: fine
    changed = load_config("tiny")
    changed.model.dropout = 0.1  # not a parameter shape: allowed
    changed.train.num_steps = 999
    check_compatible(changed, tmp_path)

    wider = load_config("tiny")
    wider.model.d_model = 64
    with pytest.raises(ConfigError, match=r"model.d_model: checkpoint 32, config 64"):
        check_compatible(wider, tmp_path)
    sparse = load_config("tiny")
    sparse.model.ff_sparsity = 8
    with pytest.raises(ConfigError, match=r"model.ff_sparsity"):
        check_compatible(sparse, tmp_path)


def test_no_saved_config_means_nothing_to_check(tmp_path):
    check_compatible(load_config("tiny"), tmp_path)
