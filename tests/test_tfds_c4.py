"""C4 through tensorflow-datasets, offline: tfds.testing.mock_data stands in for the prepared shards."""

import json

import numpy as np
import pytest

from scaling_sparse.config import load_config
from scaling_sparse.data import DataError
from scaling_sparse.data.pipeline import build_data


def c4_config(data_dir):
    c = load_config("tiny")
    c.train.update(batch_size=2, seq_len=16, eval_batches=3)
    c.data.update(source="tfds", tfds_name="c4/en:3.1.0", tfds_data_dir=str(data_dir),
                  tokenizer_train_chars=20_000)
    return c


def test_missing_data_dir_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match=r"tfds_data_dir=.*does not exist.*tfds build c4/en --version=3.1.0"):
        build_data(c4_config(tmp_path / "absent"), tmp_path / "work")


@pytest.fixture(scope="module")
def tfds():
    from scaling_sparse.data.tfds_c4 import import_tfds

    tf, tfds = import_tfds()
    assert tf.config.get_visible_devices("GPU") == []  # TensorFlow kept off the accelerator
    return tfds


def test_unprepared_data_dir_is_a_clear_error(tmp_path, tfds):
    (tmp_path / "tfds").mkdir()
    with pytest.raises(DataError, match=r"c4/en:3.1.0 is not prepared under .*tfds build"):
        build_data(c4_config(tmp_path / "tfds"), tmp_path / "work")


@pytest.fixture
def mock_c4(tmp_path, tfds):
    """A data dir holding C4's metadata (so the builder counts as prepared) and mocked records."""
    data_dir = tmp_path / "tfds"
    builder = tfds.builder("c4/en:3.1.0", data_dir=str(data_dir), try_gcs=False)
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    with tfds.testing.mock_data(num_examples=30, data_dir=str(data_dir)):
        yield data_dir


def test_c4_yields_packed_batches_and_resumes(mock_c4, tmp_path):
    config, work = c4_config(mock_c4), tmp_path / "work"
    data = build_data(config, work)
    tok = data.tokenizer
    assert (work / "tokenizer.model").is_file()  # trained on the (mock) train split and cached
    assert tok.vocab_size <= config.model.vocab_size and tok.eos_id == 1
    assert data.stats["source"] == "tfds" and 1 <= len(data.eval_batches) <= 3

    batches = [next(data.train) for _ in range(3)]
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (2, 16)
        assert b["inputs"].dtype == np.int32 and b["weights"].dtype == np.float32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        assert (b["weights"] == 1).all()
    # windows are consecutive: each row's last target is the next row's first input
    rows = np.concatenate([b["inputs"] for b in batches])
    tgts = np.concatenate([b["targets"] for b in batches])
    np.testing.assert_array_equal(tgts[:-1, -1], rows[1:, 0])
    stream = np.concatenate([rows[0]] + [t for t in tgts])
    assert (stream == tok.eos_id).sum() >= 3  # records joined by eos (mock texts are ~5 tokens)
    first_doc = tok.decode(stream[: int(np.argmax(stream == tok.eos_id))])
    assert first_doc and set(first_doc) <= set("abcdefghij ⁇")  # mock C4 text

    # resume mid-record, also after wrapping into the next epoch (30 records ~ a few batches)
    for steps in (1, 12):
        for _ in range(steps):
            next(data.train)
        state = json.loads(json.dumps(data.train.get_state()))
        expected = [next(data.train) for _ in range(3)]
        resumed = build_data(config, work)
        resumed.train.set_state(state)
        for want in expected:
            np.testing.assert_array_equal(next(resumed.train)["inputs"], want["inputs"])
    assert data.train.get_state()["epoch"] >= 1
    with pytest.raises(DataError, match="not a 'stream' iterator state"):
        resumed.train.set_state({"kind": "packed", "epoch": 0, "position": 0})
