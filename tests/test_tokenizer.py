"""SentencePiece tokenizer: id layout, byte-exact round trips, caching in the workdir, clear errors."""

import io
import os
import random
import time

import pytest
import sentencepiece as spm

from scaling_sparse.config import load_config
from scaling_sparse.data import DataError, corpus
from scaling_sparse.data.tokenizer import MAX_SENTENCE_BYTES, PAD_ID, EOS_ID, UNK_ID, Tokenizer, cached_or_trained, \
    get_tokenizer, load_tokenizer, split_long_line, train_tokenizer, training_sentences

CODE = '''def add(a, b):
    """Adds two numbers."""
    return a + b


class Point:
\tdef __init__(self, x, y):
        self.x,  self.y = x, y   # two spaces and a tab above
'''
PROSE = ("The quick brown fox jumps over the lazy dog. Sparse layers read only a few rows of each "
         "weight matrix per token, so decoding is faster.\nA second line, with punctuation: (yes)!\n")
TEXTS = [CODE * 3, PROSE * 3, CODE + PROSE, "numbers 0123456789 and symbols ~`@$%^&*[]{}|<>?=-+;'\"\\/\n"]


@pytest.fixture(scope="module")
def small_tok():
    return train_tokenizer(TEXTS, vocab_size=128, max_chars=100_000)


def test_ids_follow_t5_layout(small_tok):
    assert (small_tok.pad_id, small_tok.eos_id, small_tok.unk_id) == (0, 1, 2) == (PAD_ID, EOS_ID, UNK_ID)
    assert small_tok.sp.bos_id() == -1  # no bos
    assert 0 < small_tok.vocab_size <= 128
    ids = small_tok.encode(CODE)
    assert ids and all(i not in (PAD_ID, EOS_ID) for i in ids)


def test_round_trip_keeps_whitespace_exactly(small_tok):
    for text in TEXTS + ["    indented\n\n\n  trailing spaces   \n"]:
        ids = small_tok.encode(text)
        assert small_tok.decode(ids) == text
    # decode accepts numpy arrays (rows of a batch) as well as lists
    import numpy as np
    assert small_tok.decode(np.asarray(small_tok.encode(PROSE), np.int32)) == PROSE
    assert small_tok.encode_batch([CODE, PROSE]) == [small_tok.encode(CODE), small_tok.encode(PROSE)]


def test_byte_fallback_round_trips_unseen_characters():
    tok = train_tokenizer(TEXTS, vocab_size=1024, max_chars=100_000)
    text = "naïve café — 漢字 😀\n"
    assert tok.decode(tok.encode(text)) == text
    assert UNK_ID not in tok.encode(text)


def test_tiny_vocab_keeps_the_most_frequent_characters():
    # ~95 distinct characters cannot all fit in 64 pieces: training must still succeed.
    text = "".join(chr(c) for c in range(32, 127)) + "\n"
    tok = train_tokenizer(TEXTS + [text] + ["common words common words\n"] * 200, vocab_size=64, max_chars=100_000)
    assert tok.vocab_size <= 64
    assert tok.decode(tok.encode("common words")) == "common words"
    assert UNK_ID in tok.encode("~`^")  # rare characters became unk


def test_max_chars_limits_training_text():
    calls = []

    def texts():
        for i in range(10_000):
            calls.append(i)
            yield f"line {i} of text\n"

    train_tokenizer(texts(), vocab_size=64, max_chars=500)
    assert len(calls) < 100  # stopped reading soon after 500 characters


def test_cached_in_workdir_and_reused(tmp_path, small_tok):
    request = {"source": "files", "vocab_size": 128}
    tok = cached_or_trained(tmp_path, request, 128, 100_000, lambda: TEXTS)
    assert (tmp_path / "tokenizer.model").is_file() and (tmp_path / "tokenizer.json").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes leave nothing behind

    def must_not_train():
        raise AssertionError("the cached tokenizer should have been reused")

    again = cached_or_trained(tmp_path, request, 128, 100_000, must_not_train)
    assert again.encode(CODE) == tok.encode(CODE)
    assert again.path == str(tmp_path / "tokenizer.model")
    with pytest.raises(DataError, match="different data config"):
        cached_or_trained(tmp_path, dict(request, vocab_size=256), 256, 100_000, must_not_train)


def test_load_given_model_and_vocab_check(tmp_path, small_tok):
    path = tmp_path / "given.model"
    path.write_bytes(small_tok.model_proto)
    tok = load_tokenizer(path, max_vocab=small_tok.vocab_size)
    assert tok.encode(PROSE) == small_tok.encode(PROSE)
    with pytest.raises(DataError, match=r"model.vocab_size"):
        load_tokenizer(path, max_vocab=small_tok.vocab_size - 1)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")


def test_rejects_model_with_other_id_layout():
    buf = io.BytesIO()  # SentencePiece's default layout: unk 0, bos 1, eos 2, no pad
    spm.SentencePieceTrainer.train(sentence_iterator=iter(PROSE.split("\n") * 20), model_writer=buf,
                                   vocab_size=40, minloglevel=2)
    with pytest.raises(DataError, match="T5's layout"):
        Tokenizer(buf.getvalue(), "default.model")


def test_long_lines_are_cut_into_pieces_sentencepiece_keeps():
    line = " ".join(["word", "naïve", "漢字😀"] * 2000)  # multi-byte characters too
    pieces = list(split_long_line(line))
    assert "".join(pieces) == line and len(pieces) > 1
    assert all(len(p.encode("utf-8")) <= MAX_SENTENCE_BYTES for p in pieces)
    assert all(p.startswith(" ") for p in pieces[1:])  # cut before a space: words stay whole
    unbroken = "x" * 10_000  # no space to cut at: cut anyway
    assert [len(p) for p in split_long_line(unbroken)] == [MAX_SENTENCE_BYTES, MAX_SENTENCE_BYTES, 10_000 - 8384]
    assert list(split_long_line("short line")) == ["short line"]
    assert sum(map(len, training_sentences([line * 10], max_chars=20_000))) < 20_000 + MAX_SENTENCE_BYTES


def test_one_50mb_line_trains_a_tokenizer(tmp_path):
    # A corpus of a single 50 MB file without a newline: SentencePiece drops sentences over 4192 bytes,
    # so the line used to leave it nothing ("raise vocab_size"); its pieces train the tokenizer now.
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(500)]
    text = " ".join(rng.choices(words, k=9_000_000))[:50_000_000]
    assert "\n" not in text and len(text) == 50_000_000
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "one_line.txt").write_text(text)
    del text
    config = load_config("tiny")
    config.data.update(source="files", path=str(tmp_path / "corpus"), tokenizer_train_chars=200_000)
    start = time.time()
    tok = get_tokenizer(config, tmp_path / "work", lambda: corpus.load_corpus(config.data, progress=False).train)
    seconds = time.time() - start
    assert (tmp_path / "work" / "tokenizer.model").is_file()
    assert 3 < tok.vocab_size <= config.model.vocab_size
    sample = " ".join(words[:20])
    assert tok.decode(tok.encode(sample)) == sample and UNK_ID not in tok.encode(sample)
    assert seconds < 10, f"reading the corpus and training took {seconds:.1f} s"
