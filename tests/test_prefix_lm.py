"""Prefix-LM data: `input eos target eos` examples with loss weight on the target tokens only."""

import json

import numpy as np
import pytest

from scaling_sparse.config import ConfigError, load_config, validate
from scaling_sparse.data import DataError, packing
from scaling_sparse.data.pipeline import build_data
from scaling_sparse.data.prefix_lm import encode_examples


class CharTokenizer:
    """One id per character (ids 3..), eos 1: enough to check the layout exactly."""

    eos_id, pad_id, vocab_size = 1, 0, 300

    def encode_batch(self, texts):
        return [[3 + ord(c) % 250 for c in t] for t in texts]


def test_mask_marks_target_tokens_and_their_eos():
    stream, mask = encode_examples(CharTokenizer(), [("ab", "xyz"), ("", "q")])
    a, b, x, y, z, q = (3 + ord(c) for c in "abxyzq")
    assert stream.tolist() == [a, b, 1, x, y, z, 1, 1, q, 1]
    assert mask.tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 1, 1]


def test_windows_carry_the_mask_as_weights():
    stream, mask = encode_examples(CharTokenizer(), [("in put", "target")] * 6)
    it = packing.PackedIterator(stream, batch_size=2, seq_len=8, seed=0, loss_mask=mask)
    for _ in range(4):
        batch = next(it)
        for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
            start = int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(stream, 8) == inputs).all(1))[0])
            np.testing.assert_array_equal(weights, mask[start + 1: start + 9])
    evals = packing.eval_batches(stream, 2, 8, 4, pad_id=0, loss_mask=mask)
    np.testing.assert_array_equal(evals[0]["weights"][0], mask[1:9])


def _write_examples(path, n=40):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"what is {i} plus one", "answer": f"it is {i + 1}"}) + "\n")
        f.write(json.dumps({"question": "no answer field"}) + "\n")


def test_build_data_prefix_lm_end_to_end(tmp_path):
    path = tmp_path / "qa.jsonl"
    _write_examples(path)
    c = load_config("tiny")
    c.train.update(batch_size=2, seq_len=16, eval_batches=2, progress=False)
    c.data.update(source="jsonl", path=str(path), input_field="question", target_field="answer",
                  validation_fraction=0.2, tokenizer_train_chars=50_000)
    data = build_data(validate(c), tmp_path / "work")
    assert data.stats["prefix_lm"] and data.stats["skipped"]["records_without_field"] == 1
    tok = data.tokenizer
    batch = next(data.train)
    w = batch["weights"]
    assert 0 < w.sum() < w.size  # some tokens are inputs (weight 0), some targets
    # Every weighted target token decodes to answer text; the question words never carry weight.
    weighted = tok.decode([int(t) for t, wt in zip(batch["targets"].ravel(), w.ravel()) if wt and t != tok.eos_id])
    unweighted = tok.decode([int(t) for t, wt in zip(batch["targets"].ravel(), w.ravel()) if not wt])
    assert "what" not in weighted and "plus" not in weighted
    assert "it is" in weighted or "it" in weighted
    assert "plus" in unweighted or "what" in unweighted
    # The cache (tokens and masks) is reused on a second build.
    again = build_data(validate(c), tmp_path / "work")
    assert again.stats["cache_hit"]
    np.testing.assert_array_equal(again.eval_batches[0]["weights"], data.eval_batches[0]["weights"])


def test_prefix_lm_needs_jsonl():
    c = load_config("tiny")
    c.data.input_field = "question"
    with pytest.raises(ConfigError, match="data.input_field"):
        validate(c)


def test_prefix_lm_missing_fields_is_a_clear_error(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"text": "plain"}) + "\n")
    c = load_config("tiny")
    c.train.progress = False
    c.data.update(source="jsonl", path=str(path), input_field="question", target_field="answer")
    with pytest.raises(DataError, match="question"):
        build_data(validate(c), tmp_path / "work")
