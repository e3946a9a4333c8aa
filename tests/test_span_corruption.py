"""T5 span corruption (scaling_sparse/data/span_corruption.py): the noise mask, sentinels, lengths, the
batch contract, resumable iterators over local corpora and (mocked) TFDS C4, sentinel pieces."""

import json
import types

import numpy as np
import pytest

from scaling_sparse.config import ConfigError, load_config, validate
from scaling_sparse.data import DataError, span_corruption as sc, tokenizer as tk
from scaling_sparse.data.pipeline import build_data


def span_config(**train):
    """The tiny preset as an encoder-decoder on span corruption: inputs 32, targets 16, batch 4."""
    c = load_config("tiny")
    c.model.arch = "encdec"
    c.train.update(dict(dict(batch_size=4, seq_len=16, inputs_len=32, eval_batches=2), **train))
    c.data.update(objective="span_corruption", tokenizer_train_chars=50_000, validation_fraction=0.2)
    return c


def runs(mask):
    """(number of noise spans, number of non-noise spans) of a bool mask."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    return int(starts.sum()), int((~mask & ~np.concatenate([[False], ~mask[:-1]])).sum())


# ---- the mask, sentinels and lengths ---------------------------------------------------------------

def test_random_spans_helper_matches_t5():
    assert sc.random_spans_helper(512, 0.15, 3.0) == (568, 114)  # T5's C4 numbers
    assert sc.random_spans_helper(512, 0.15, 3.0, targets_length=256) == (568, 114)
    # a targets length below T5's 114 shortens the chunk instead of failing
    tokens, targets = sc.random_spans_helper(512, 0.15, 3.0, targets_length=100)
    assert tokens < 568 and targets <= 100
    with pytest.raises(DataError, match="train.inputs_len"):
        sc.random_spans_helper(2, 0.15, 3.0)


@pytest.mark.parametrize("length", [1, 2, 7, 34, 100, 568])
def test_noise_mask_counts_spans_and_starts_with_nonnoise(length):
    noise, spans = (int(x) for x in sc.noise_counts(length, 0.15, 3.0))
    if length >= 2:
        assert noise == min(max(round(length * 0.15), 1), length - 1)
        assert spans == max(round(noise / 3.0), 1)
    for seed in range(20):
        mask = sc.random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(seed))
        assert mask.shape == (length,) and mask.dtype == bool
        assert not mask[0]  # starts with non-noise
        if length >= 2:
            assert mask[-1] and mask.sum() == noise
            assert runs(mask) == (spans, spans)  # alternating non-noise / noise spans
    if length == 568:
        assert (noise, spans) == (85, 28)


def test_sentinels_replace_spans_as_t5_does():
    tokens = np.arange(10, 19)  # a b c d e f g h i
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0], bool)
    sentinels = (63, 62, 61)
    np.testing.assert_array_equal(sc.noise_span_to_unique_sentinel(tokens, mask, sentinels),
                                  [10, 11, 63, 14, 15, 16, 62, 18])
    np.testing.assert_array_equal(sc.nonnoise_span_to_unique_sentinel(tokens, mask, sentinels),
                                  [63, 12, 13, 62, 17, 61])


def fake_tokenizer(n_sentinels=8, vocab=64):
    return types.SimpleNamespace(sentinel_ids=tuple(vocab - 1 - i for i in range(n_sentinels)), eos_id=1, path="fake")


@pytest.mark.parametrize("inputs_len,seq_len", [(32, 16), (64, 32), (512, 256), (512, 100)])
def test_examples_round_trip_and_fit_the_lengths(inputs_len, seq_len):
    config = span_config(inputs_len=inputs_len, seq_len=seq_len)
    corruption = sc.SpanCorruption.from_config(config, fake_tokenizer(100, 32100))
    rng = np.random.default_rng(0)
    lengths = list(range(1, corruption.tokens_length + 1)) if inputs_len < 512 else [1, 2, 3, 100, 567, 568]
    lengths = [n for n in lengths if n <= corruption.tokens_length]
    for n in lengths:
        tokens = rng.integers(3, 32000, n)
        inputs, targets = corruption.example(tokens, np.random.default_rng(n))
        assert inputs[-1] == targets[-1] == 1 and len(inputs) <= inputs_len and len(targets) <= seq_len
        np.testing.assert_array_equal(sc.reconstruct(inputs, targets, corruption.sentinel_ids), tokens)
    # full chunks fill the encoder exactly when the targets do not bound them (T5's 568 -> 512)
    if (inputs_len, seq_len) == (512, 256):
        inputs, targets = corruption.example(rng.integers(3, 32000, 568), rng)
        assert (len(inputs), len(targets)) == (512, 114)
    batch = corruption.batch([corruption.example(rng.integers(3, 100, corruption.tokens_length), rng), None])
    assert batch["inputs"].shape == (2, inputs_len) and batch["targets"].shape == (2, seq_len)
    assert {k: v.dtype for k, v in batch.items()} == {"inputs": np.int32, "decoder_inputs": np.int32,
                                                      "targets": np.int32, "weights": np.float32}
    np.testing.assert_array_equal(batch["decoder_inputs"][:, 0], 0)
    np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:], batch["targets"][:, :-1])
    np.testing.assert_array_equal(batch["weights"], batch["targets"] != 0)
    assert not batch["inputs"][1].any() and not batch["weights"][1].any()  # the empty padding row


def test_too_many_spans_for_the_sentinels_is_a_clear_error():
    with pytest.raises(DataError, match=r"needs 28 sentinels.*has 8.*train.inputs_len.*model.vocab_size"):
        sc.SpanCorruption.from_config(span_config(inputs_len=512, seq_len=256), fake_tokenizer(8))


def test_config_fields_are_validated():
    from scaling_sparse.config import base_config

    base = base_config()
    assert (base.data.objective, base.data.noise_density, base.data.mean_noise_span_length,
            base.train.inputs_len) == ("lm", 0.15, 3.0, 512)
    assert load_config("tiny").train.inputs_len == 64  # the tiny preset's max_len
    for section, field, value in (("data", "objective", "mlm"), ("data", "noise_density", 0.0),
                                  ("data", "noise_density", 1.0), ("data", "mean_noise_span_length", 0.5),
                                  ("train", "inputs_len", 0), ("train", "inputs_len", -4)):
        c = span_config()
        c[section][field] = value
        with pytest.raises(ConfigError, match=f"{section}.{field}"):
            validate(c)


# ---- sentinel pieces in the tokenizer ----------------------------------------------------------------

TEXTS = ["the cat sat on a mat and the dog ran to the park while birds sang in tall green trees.\n" * 3] * 40


@pytest.fixture(scope="module")
def plain_model():
    return tk.train_tokenizer(TEXTS, 56, 100_000)  # no sentinels: like T5's 32000-piece spm


def test_given_model_gets_sentinels_above_its_pieces_when_the_vocabulary_has_room(tmp_path, plain_model):
    n = plain_model.vocab_size
    assert plain_model.sentinel_ids == () and tk.sentinel_count(64) == 8 and tk.sentinel_count(32000) == 100
    path = tmp_path / "plain.model"
    path.write_bytes(plain_model.model_proto)
    tok = tk.load_tokenizer(path, max_vocab=n + 8, sentinels=8)  # T5 / seqio: 32000 pieces + 100 ids
    assert tok.vocab_size == n + 8 and tok.sentinel_ids == tuple(n + 7 - i for i in range(8))
    assert tok.sp.id_to_piece(tok.sentinel_ids[0]) == "<extra_id_0>"
    assert tok.encode(TEXTS[0]) == plain_model.encode(TEXTS[0])  # the model's own ids are unchanged
    # a model that has <extra_id_N> pieces is used as it is
    (tmp_path / "with.model").write_bytes(tok.model_proto)
    again = tk.load_tokenizer(tmp_path / "with.model", max_vocab=n + 8, sentinels=8)
    assert again.model_proto == tok.model_proto and again.sentinel_ids == tok.sentinel_ids
    # the language-model objective leaves a given model alone
    assert tk.load_tokenizer(path, max_vocab=n + 8).sentinel_ids == ()


def test_given_model_without_room_overwrites_its_rarest_pieces(tmp_path, plain_model):
    path = tmp_path / "plain.model"
    path.write_bytes(plain_model.model_proto)
    tok = tk.load_tokenizer(path, max_vocab=plain_model.vocab_size, sentinels=8)  # trax: 32000 pieces, ids 31999..
    assert tok.vocab_size == plain_model.vocab_size and len(tok.sentinel_ids) == 8
    assert list(tok.sentinel_ids) == sorted(tok.sentinel_ids, reverse=True)  # the highest ids, extra_id_0 on top
    ids = [i for text in TEXTS for i in tok.encode(text)]
    assert not set(ids) & set(tok.sentinel_ids)  # text never encodes to a sentinel
    assert tok.decode(tok.encode(TEXTS[0])) == TEXTS[0]


# ---- local corpora end to end -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def span_data(corpus, tmp_path_factory):
    config = span_config()
    config.data.update(source="files", path=str(corpus))
    validate(config)
    work = tmp_path_factory.mktemp("span_work")
    return config, work, build_data(config, work)


def test_local_corpus_batches_follow_the_contract(span_data):
    config, _, data = span_data
    tok, train = data.tokenizer, data.train
    assert tok.vocab_size <= config.model.vocab_size
    assert tok.sentinel_ids == tuple(tok.vocab_size - 1 - i for i in range(8))  # T5: vocab_size - 1 - i
    assert data.stats["objective"] == "span_corruption" and data.stats["chunk_tokens"] == 34
    chunks = {tuple(train.stream[i * 34:(i + 1) * 34]) for i in range(train.n_chunks)}  # epoch 0's grid
    for _ in range(3):
        batch = next(train)
        assert {k: v.shape for k, v in batch.items()} == {"inputs": (4, 32), "decoder_inputs": (4, 16),
                                                          "targets": (4, 16), "weights": (4, 16)}
        np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:], batch["targets"][:, :-1])
        np.testing.assert_array_equal(batch["weights"], batch["targets"] != 0)
        for x, y in zip(batch["inputs"], batch["targets"]):
            assert tuple(sc.reconstruct(x, y, tok.sentinel_ids)) in chunks  # exact round trip to the text
            assert x[0] not in tok.sentinel_ids and y[0] == tok.sentinel_ids[0]
    assert tok.eos_id not in train.stream  # documents back to back, as T5 concatenates them
    assert 1 <= len(data.eval_batches) <= 2
    for b in data.eval_batches:
        assert b["inputs"].shape == (4, 32) and b["targets"].shape == (4, 16)


def test_local_corpus_resumes_and_evaluates_deterministically(span_data):
    config, work, data = span_data
    for _ in range(60):  # past the first epoch (~52 batches)
        next(data.train)
    state = json.loads(json.dumps(data.train.get_state()))
    assert state["kind"] == "span_corruption" and state["epoch"] >= 1
    expected = [next(data.train) for _ in range(3)]
    resumed = build_data(config, work)
    assert resumed.stats["cache_hit"] is True
    resumed.train.set_state(state)
    for want in expected:
        got = next(resumed.train)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    for a, b in zip(resumed.eval_batches, data.eval_batches):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])
    with pytest.raises(DataError, match="not a 'span_corruption' iterator state"):
        resumed.train.set_state({"kind": "packed", "epoch": 0, "position": 0})


def test_processes_corrupt_their_rows_of_the_same_global_batch(span_data):
    config, work, _ = span_data
    whole = build_data(config, work)
    parts = [build_data(config, work, process_index=i, process_count=2) for i in range(2)]
    for _ in range(3):
        want = next(whole.train)
        got = [next(p.train) for p in parts]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
    for i, want in enumerate(whole.eval_batches):
        np.testing.assert_array_equal(
            np.concatenate([p.eval_batches[i]["targets"] for p in parts]), want["targets"])
    assert parts[0].train.get_state() == parts[1].train.get_state() == whole.train.get_state()


def test_an_lm_tokenizer_is_not_reused_for_span_corruption(corpus, tmp_path):
    lm = load_config("tiny")
    lm.train.update(batch_size=2, seq_len=16)
    lm.data.update(source="files", path=str(corpus), tokenizer_train_chars=50_000, validation_fraction=0.2)
    assert "sentinels" not in tk.tokenizer_request(lm)  # an lm workdir's stored request is unchanged
    assert build_data(lm, tmp_path).tokenizer.sentinel_ids == ()
    span = span_config()
    span.data.update(source="files", path=str(corpus))
    assert tk.tokenizer_request(span)["sentinels"] == 8
    with pytest.raises(DataError, match="different data config"):
        build_data(span, tmp_path)


# ---- TFDS C4 (mocked) ---------------------------------------------------------------------------------

@pytest.fixture
def mock_c4(tmp_path):
    from scaling_sparse.data.tfds_c4 import import_tfds

    _, tfds = import_tfds()
    data_dir = tmp_path / "tfds"
    builder = tfds.builder("c4/en:3.1.0", data_dir=str(data_dir), try_gcs=False)
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    with tfds.testing.mock_data(num_examples=30, data_dir=str(data_dir)):
        yield data_dir


def test_c4_span_corruption_batches_resume_and_split_over_processes(mock_c4, tmp_path):
    config = span_config(batch_size=2)
    config.data.update(source="tfds", tfds_name="c4/en:3.1.0", tfds_data_dir=str(mock_c4), tokenizer_train_chars=20_000)
    validate(config)
    work = tmp_path / "work"
    data = build_data(config, work)
    tok = data.tokenizer
    assert len(tok.sentinel_ids) == 8 and data.stats["objective"] == "span_corruption"
    assert 1 <= len(data.eval_batches) <= 2
    text = []
    for _ in range(3):
        batch = next(data.train)
        assert batch["inputs"].shape == (2, 32) and batch["targets"].shape == (2, 16)
        np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:], batch["targets"][:, :-1])
        for x, y in zip(batch["inputs"], batch["targets"]):
            tokens = sc.reconstruct(x, y, tok.sentinel_ids)
            assert len(tokens) == 34 and not set(tokens.tolist()) & set(tok.sentinel_ids)
            text.append(tok.decode(tokens))
    assert set("".join(text)) <= set("abcdefghij ⁇")  # mock C4 text, chunks back to back
    for _ in range(10):  # into the second epoch of the 30 mock records
        next(data.train)
    state = json.loads(json.dumps(data.train.get_state()))
    assert state["kind"] == "span_corruption_stream"
    expected = [next(data.train) for _ in range(2)]
    resumed = build_data(config, work)
    resumed.train.set_state(state)
    halves = [build_data(config, work, process_index=i, process_count=2) for i in range(2)]
    for h in halves:
        h.train.set_state(state)
    for want in expected:
        got = next(resumed.train)
        rows = [next(h.train) for h in halves]
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
            np.testing.assert_array_equal(np.concatenate([r[k] for r in rows]), want[k])
    np.testing.assert_array_equal(resumed.eval_batches[0]["inputs"], data.eval_batches[0]["inputs"])
    with pytest.raises(DataError, match="not a 'span_corruption_stream' iterator state"):
        resumed.train.set_state({"kind": "stream", "epoch": 0, "record": 0, "token": 0})
