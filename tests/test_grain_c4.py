"""TFDS text through Grain (config.data.tfds_reader=grain, data/grain_rows.py), offline: a small text
dataset stored as a real TFDS ArrayRecord dataset. Each of 2 processes reads about half of the records
(counted at the data source), global batches equal the 1-process run's, a resume at a deep position
reads no earlier record, a position saved on 2 processes resumes on 1, and 2 real processes train,
stop and resume on 1 with the 1-process run's losses."""

import json
import pathlib

import numpy as np
import pytest

from conftest import free_port, start_cli
from scaling_sparse.config import load_config, validate
from scaling_sparse.data import DataError, grain_rows
from scaling_sparse.data.pipeline import build_data
from scaling_sparse.metrics import read_metrics

pytestmark = pytest.mark.xdist_group("grain_c4")  # one worker builds the datasets once

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees".split()


def store(data_dir, name, file_format, train=240):
    import tensorflow_datasets as tfds

    from scaling_sparse.data.tfds_c4 import import_tfds

    import_tfds()  # TensorFlow off the accelerator before tfds starts it
    rng = np.random.default_rng(0)
    text = lambda n: " ".join(rng.choice(WORDS, n)) + "."  # noqa: E731
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version="1.0.0", features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        split_datasets={"train": [(i, {"text": text(int(rng.integers(3, 30)))}) for i in range(train)],
                        "validation": [(i, {"text": text(12)}) for i in range(20)]},
        data_dir=str(data_dir), file_format=file_format, disable_shuffling=True)
    return data_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return store(tmp_path_factory.mktemp("tfds"), "tiny_text", "array_record")


@pytest.fixture(scope="module")
def tokenizer(data_dir, tmp_path_factory):
    """A tokenizer trained once on the train split (every build below reuses it)."""
    work = tmp_path_factory.mktemp("tok")
    build_data(config(data_dir), work)
    return str(work / "tokenizer.model")


def config(data_dir, tokenizer="", batch_size=4):
    c = load_config("tiny")
    c.train.update(batch_size=batch_size, seq_len=16, eval_batches=2)
    c.model.vocab_size = 128
    c.data.update(source="tfds", tfds_name="tiny_text:1.0.0", tfds_data_dir=str(data_dir), tfds_reader="grain",
                  tokenizer_path=tokenizer, tokenizer_train_chars=20_000, shuffle_seed=3)
    return c


class CountingSource:
    """The TFDS data source, counting which records are read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.source[i]


def counted_build(monkeypatch, data_dir, tokenizer, work, config_=None, **kw):
    """build_data (of `config_`, default the module's config) with the training source's reads counted."""
    sources = []
    original = grain_rows.open_source

    def open_source(builder, split):
        sources.append(CountingSource(original(builder, split)))
        return sources[-1]

    monkeypatch.setattr(grain_rows, "open_source", open_source)
    data = build_data(validate(config_) if config_ is not None else config(data_dir, tokenizer), work, **kw)
    monkeypatch.setattr(grain_rows, "open_source", original)
    train_source = sources[0]
    train_source.read.clear()  # the validation stream read the other source; count training reads only
    return data, train_source


def test_each_process_reads_its_half_and_the_global_batches_equal_one_process(data_dir, tokenizer, tmp_path,
                                                                             monkeypatch):
    one, one_source = counted_build(monkeypatch, data_dir, tokenizer, tmp_path / "w")
    assert one.stats["reader"] == "grain"
    two = [counted_build(monkeypatch, data_dir, tokenizer, tmp_path / "w", process_index=i, process_count=2)
           for i in range(2)]
    steps = 12  # about 40 of the 240 records: within the first epoch
    for _ in range(steps):
        want = next(one.train)
        got = [next(data.train) for data, _ in two]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    read = [source.read for _, source in two]
    print(f"records read: 1 process {len(one_source.read)}; 2 processes {[len(r) for r in read]}")
    assert len(read[0]) + len(read[1]) == len(one_source.read)
    assert abs(len(read[0]) - len(read[1])) <= 0.25 * len(one_source.read)
    assert not set(read[0]) & set(read[1])  # no record read by both (within an epoch)
    assert len(set(one_source.read)) == len(one_source.read) < 240


def test_a_deep_resume_reads_no_earlier_record_and_a_two_process_position_resumes_on_one(
        data_dir, tokenizer, tmp_path, monkeypatch):
    one, source = counted_build(monkeypatch, data_dir, tokenizer, tmp_path / "w")
    for _ in range(150):  # past the first epoch (240 records, about 20 tokens each)
        next(one.train)
    state = json.loads(json.dumps(one.train.get_state()))
    assert state["kind"] == "grain_rows" and len(state["rows"]) == 4
    expected = [next(one.train) for _ in range(3)]

    resumed, resumed_source = counted_build(monkeypatch, data_dir, tokenizer, tmp_path / "w")
    next_k = {}  # row -> the k of every record the resumed iterator reads
    refill = resumed.train._refill
    resumed.train._refill = lambda rows: ([next_k.setdefault(r, []).append(resumed.train._next[r]) for r in rows],
                                          refill(rows))
    resumed.train.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed.train)["inputs"], want["inputs"])
    for r, (k, _) in enumerate(state["rows"]):
        assert min(next_k[r]) == k  # from the saved record on, never an earlier one
    assert len(resumed_source.read) <= 4 * 3 * 17 and len(source.read) > 10 * len(resumed_source.read)

    # A position saved by 2 processes (each holds its rows; train.py gathers them) resumes on 1.
    two = [build_data(config(data_dir, tokenizer), tmp_path / "w", process_index=i, process_count=2)
           for i in range(2)]
    for data in two:
        for _ in range(40):
            next(data.train)
    gathered = np.concatenate([data.train.local_state() for data in two])
    for data in two:
        data.train.gather = lambda local: gathered
    saved = two[0].train.get_state()
    assert saved == two[1].train.get_state() and len(saved["rows"]) == 4
    one_again = build_data(config(data_dir, tokenizer), tmp_path / "w")
    one_again.train.set_state(saved)
    np.testing.assert_array_equal(next(one_again.train)["inputs"],
                                  np.concatenate([next(d.train)["inputs"] for d in two]))
    with pytest.raises(DataError, match="batch size the run was saved with"):
        build_data(config(data_dir, tokenizer, batch_size=8), tmp_path / "w").train.set_state(saved)


def test_each_reader_refuses_a_copy_it_cannot_read_and_says_what_to_do(data_dir, tmp_path):
    tfrecord_dir = store(tmp_path / "tfds", "tfrecord_text", "tfrecord", train=10)
    c = config(tfrecord_dir)
    c.data.tfds_name = "tfrecord_text:1.0.0"
    with pytest.raises(DataError, match=r"stored as \['tfrecord'\].*tfds convert_format --dataset_version_dir=.*"
                                        r"--out_file_format=array_record.*tfds_reader=tf.data"):
        build_data(c, tmp_path / "w")
    c = config(data_dir)
    c.data.tfds_reader = "tf.data"
    with pytest.raises(DataError, match=r"stored as \['array_record'\].*tfds_reader=grain"):
        build_data(c, tmp_path / "w")


def test_two_processes_train_then_one_resumes_with_the_one_process_losses(data_dir, tokenizer, tmp_path):
    """Real processes: the checkpoint's data position is gathered from both (a JAX collective)."""
    def train(workdir, num_steps, process=None, devices=1):
        return start_cli("train", f"--config={ROOT / 'experiments' / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
                         "--config.data.source=tfds", "--config.data.tfds_name=tiny_text:1.0.0",
                         f"--config.data.tfds_data_dir={data_dir}", "--config.data.tfds_reader=grain",
                         f"--config.data.tokenizer_path={tokenizer}", "--config.model.vocab_size=128",
                         "--config.train.batch_size=8", f"--config.train.num_steps={num_steps}",
                         "--config.train.log_every=1", "--config.train.eval_every=1000",
                         "--config.train.checkpoint_every=3", "--config.train.sample_at_end=False",
                         "--config.train.progress=False", process=process, devices=devices)

    def wait(procs):
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"

    reference, multi = tmp_path / "one", tmp_path / "multi"
    wait([train(reference, 8)])
    port = free_port()
    wait([train(multi, 5, process=(port, i, 2), devices=2) for i in range(2)])  # saves at 3 and 5
    rows = json.loads((multi / "checkpoints" / "5" / "data" / "metadata").read_text())["rows"]
    assert len(rows) == 8
    wait([train(multi, 8)])  # resumed on 1 process
    want = {r["step"]: r["train_loss"] for r in read_metrics(reference)}
    got = {r["step"]: r["train_loss"] for r in read_metrics(multi)}
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)], rtol=1e-4)


def test_trime_long_groups_are_consecutive_windows_of_one_record_stream_per_process_and_resume(
        data_dir, tokenizer, tmp_path, monkeypatch):
    """TRIME_long on TFDS (group_rows G = 2 of a batch of 4): each group's rows, step after step, are the
    consecutive windows of one stream of records (the group's records of Grain's order, back to back);
    2 processes each read their group's records only and give the 1-process batches; a saved position resumes."""
    def long_config(batch_size=4):
        c = config(data_dir, tokenizer, batch_size=batch_size)
        c.train.objective = "trime"
        c.train.trime.update(memory="long", group_rows=2)
        return c

    def build(c, **kw):
        return counted_build(monkeypatch, data_dir, tokenizer, tmp_path / "w", c, **kw)

    one, one_source = build(long_config())
    assert one.train.group_rows == 2 and list(one.train.streams) == [0, 1]
    steps = 10
    batches = [next(one.train)["inputs"] for _ in range(steps)]
    tok = one.tokenizer
    for s in range(2):  # stream s: rows 2s, 2s + 1 of each step, in order, are its text without a gap
        windows = [b[2 * s + i] for b in batches for i in range(2)]
        got = np.concatenate(windows)
        stream, k = [], 0
        while sum(map(len, stream)) < len(got):  # the stream's records: Grain's order at k * 2 + s
            ids = tok.encode_batch([grain_rows._text(one.train.order[k * 2 + s])])[0]
            stream.append(np.asarray(ids + [tok.eos_id]))
            k += 1
        np.testing.assert_array_equal(got, np.concatenate(stream)[:len(got)])

    two = [build(long_config(), process_index=i, process_count=2) for i in range(2)]
    for step in range(steps):
        got = np.concatenate([next(data.train)["inputs"] for data, _ in two])
        np.testing.assert_array_equal(got, batches[step])
    reads = [set(src.read) for _, src in two]
    assert not reads[0] & reads[1] and len(reads[0] | reads[1]) == len(set(one_source.read))

    again, _ = build(long_config())
    for _ in range(4):
        next(again.train)
    state = json.loads(json.dumps(again.train.get_state()))
    assert state["group_rows"] == 2 and len(state["rows"]) == 2  # a position per stream
    resumed, _ = build(long_config())
    resumed.train.set_state(state)
    for step in range(4, steps):
        np.testing.assert_array_equal(next(resumed.train)["inputs"], batches[step])
    with pytest.raises(DataError, match="groups of 2 consecutive rows.*group_rows=2"):
        build_data(config(data_dir, tokenizer), tmp_path / "w").train.set_state(state)
    with pytest.raises(DataError, match="not whole TRIME_long groups"):
        build(long_config(batch_size=2), process_index=0, process_count=2)
