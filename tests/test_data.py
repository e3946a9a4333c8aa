"""Local corpora, packing, the resumable iterator and build_data end to end (tiny sizes)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scaling_sparse.config import load_config
from scaling_sparse.data import DataError, cache, corpus, packing
from scaling_sparse.data.pipeline import build_data

DOCS = [f"document {i}: " + " ".join(f"word{j % 7}" for j in range(i * 5 + 3)) + "\n" for i in range(12)]


def tiny(source="files", path="", **data):
    c = load_config("tiny")
    c.train.update(batch_size=2, seq_len=16, eval_batches=2)
    c.data.update(dict(dict(source=source, path=path, validation_fraction=0.2, tokenizer_train_chars=50_000), **data))
    return c


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i, text in enumerate(DOCS):
        (d / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(text)
    return d


# ---- packing -------------------------------------------------------------------------------------

def test_join_documents_puts_eos_after_every_document():
    stream = packing.join_documents([[5, 6], [7], [8, 9, 10]], eos_id=1, vocab_size=64)
    assert stream.dtype == np.uint16
    assert stream.tolist() == [5, 6, 1, 7, 1, 8, 9, 10, 1]
    assert packing.join_documents([[5]], eos_id=1, vocab_size=100_000).dtype == np.int32


def test_packed_batches_shapes_and_shifted_targets():
    stream = np.arange(2, 2 + 16 * 10 + 1).astype(np.uint16)  # exactly 10 windows of 16 (+1)
    it = packing.PackedIterator(stream, batch_size=4, seq_len=16, seed=0)
    seen = []
    for _ in range(5):  # 20 windows: two epochs of 10
        b = next(it)
        assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (4, 16)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32 and b["weights"].dtype == np.float32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        assert (b["weights"] == 1).all()
        # every row is a contiguous slice of the stream starting on the window grid
        for row in b["inputs"]:
            assert (np.diff(row) == 1).all() and (row[0] - 2) % 16 == 0
        seen.extend(int(r[0]) for r in b["inputs"])
    # each epoch visits every window exactly once, in a different order
    assert sorted(seen[:10]) == sorted(seen[10:]) == list(range(2, 2 + 160, 16))
    assert seen[:10] != seen[10:]


def test_state_round_trip_reproduces_batches_across_epochs():
    stream = np.random.default_rng(0).integers(3, 60, size=1000).astype(np.uint16)
    it = packing.PackedIterator(stream, batch_size=3, seq_len=16, seed=7, fingerprint="abc")
    for _ in range(20):  # 60 windows > 62 per epoch: close to the boundary
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]  # crosses into epoch 1 (shifted grid)
    assert it.get_state()["epoch"] == 1
    fresh = packing.PackedIterator(stream, batch_size=3, seq_len=16, seed=7, fingerprint="abc")
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    other_seed = packing.PackedIterator(stream, batch_size=3, seq_len=16, seed=8)
    assert not np.array_equal(next(other_seed)["inputs"], next(packing.PackedIterator(stream, 3, 16, 7))["inputs"])
    with pytest.raises(DataError, match="different corpus"):
        packing.PackedIterator(stream, 3, 16, 7, fingerprint="xyz").set_state(state)
    with pytest.raises(DataError, match="not a 'packed' iterator state"):
        fresh.set_state({"kind": "stream", "epoch": 0, "record": 0, "token": 0})


def test_processes_read_their_rows_of_the_same_global_batches():
    stream = np.random.default_rng(1).integers(3, 60, size=3000).astype(np.uint16)
    mask = (np.arange(3000) % 3 == 0).astype(np.float32)
    whole = packing.PackedIterator(stream, batch_size=8, seq_len=16, seed=3, loss_mask=mask)
    parts = [packing.PackedIterator(stream, 8, 16, 3, loss_mask=mask, process_index=i, process_count=4) for i in range(4)]
    for _ in range(30):  # across an epoch boundary (186 windows / 8 per batch)
        want = next(whole)
        got = [next(p) for p in parts]
        for k in want:
            assert got[0][k].shape[0] == 2
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
    assert all(p.get_state() == whole.get_state() for p in parts)  # the global position, one for all
    evals = packing.eval_batches(stream, 8, 16, 2, pad_id=0)
    local = [packing.eval_batches(stream, 8, 16, 2, pad_id=0, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([local[0][1]["inputs"], local[1][1]["inputs"]]), evals[1]["inputs"])
    with pytest.raises(DataError, match="not divisible by the 3 processes"):
        packing.PackedIterator(stream, 8, 16, 3, process_index=0, process_count=3)


def test_too_short_training_split_is_a_clear_error():
    with pytest.raises(DataError, match="seq_len"):
        packing.PackedIterator(np.arange(10, dtype=np.uint16), batch_size=2, seq_len=16, seed=0)


def test_eval_batches_pad_with_zero_weight():
    stream = np.arange(3, 3 + 40).astype(np.uint16)  # 39 targets: windows of 16, 16, 7
    batches = packing.eval_batches(stream, batch_size=2, seq_len=16, max_batches=5, pad_id=0)
    assert len(batches) == 2
    assert batches[0]["weights"].sum() == 32
    last = batches[1]
    assert last["weights"][0].sum() == 7 and last["weights"][1].sum() == 0  # partial window, padded row
    assert (last["targets"][0, 7:] == 0).all()
    np.testing.assert_array_equal(last["inputs"][0, :7], stream[32:39])
    assert sum(b["weights"].sum() for b in batches) == len(stream) - 1  # every validation target once
    assert len(packing.eval_batches(stream, 2, 4, max_batches=3, pad_id=0)) == 3  # capped
    with pytest.raises(DataError, match="validation split has 1 tokens"):
        packing.eval_batches(stream[:1], 2, 16, 2, 0)


# ---- corpora -------------------------------------------------------------------------------------

def test_files_source_skips_bad_files_with_counts(text_dir):
    (text_dir / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (text_dir / "dangling.txt").symlink_to(text_dir / "no-such-file")
    unreadable = 1
    if os.geteuid() != 0:  # root reads mode-000 files anyway
        (text_dir / "secret.txt").write_text("hidden")
        os.chmod(text_dir / "secret.txt", 0)
        unreadable += 1
    (text_dir / "empty.txt").write_text("  \n")
    c = tiny(path=str(text_dir)).data
    result = corpus.load_corpus(c, progress=False)
    assert result.stats["skipped"]["non_utf8_files"] == 1
    assert result.stats["skipped"]["unreadable_files"] == unreadable
    assert result.stats["skipped"]["empty_files"] == 1
    assert result.stats["skipped_files"] == 1 + unreadable
    assert result.stats["documents"] == len(DOCS)
    assert sorted(result.train + result.validation) == sorted(DOCS)
    # a glob selects files the same way
    glob_corpus = corpus.load_corpus(tiny(path=str(text_dir / "**" / "doc*.txt")).data, progress=False)
    assert sorted(glob_corpus.train + glob_corpus.validation) == sorted(DOCS)


def test_symlink_loops_and_unreadable_directories_are_skipped_with_counts(text_dir, tmp_path, monkeypatch):
    os.symlink(text_dir, text_dir / "sub" / "up")           # a directory link back to its parent
    os.symlink(text_dir / "self", text_dir / "self")        # a link to itself (ELOOP)
    os.symlink(text_dir / "b", text_dir / "sub" / "a")      # sub/a -> b -> sub/a (ELOOP)
    os.symlink(text_dir / "sub" / "a", text_dir / "b")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "more.txt").write_text("linked in from elsewhere\n")
    os.symlink(outside, text_dir / "linked")                 # a directory link that does not loop: followed
    locked = text_dir / "locked"
    locked.mkdir()
    (locked / "hidden.txt").write_text("never read\n")
    os.chmod(locked, 0)
    if os.geteuid() == 0:  # root lists mode-000 directories anyway: make listing it fail as for a user
        real_scandir = os.scandir

        def scandir(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        c = tiny(path=str(text_dir)).data
        source = corpus.list_files(c, exclude=tmp_path / "work")
        result = corpus.load_corpus(c, progress=False, source=source)
        # in a glob, `**` follows directory links: the paths through the loop are left out
        glob_corpus = corpus.load_corpus(tiny(path=str(text_dir / "**" / "*.txt")).data, progress=False)
    finally:
        os.chmod(locked, 0o755)
    skipped = result.stats["skipped"]
    assert skipped["symlink_loops"] == 4 and skipped["unreadable_dirs"] == 1  # up, self, sub/a, b
    assert result.stats["skipped_files"] == 4
    assert sorted(result.train + result.validation) == sorted(DOCS + ["linked in from elsewhere\n"])
    assert sorted(glob_corpus.train + glob_corpus.validation) == sorted(DOCS + ["linked in from elsewhere\n"])
    assert glob_corpus.stats["skipped"]["symlink_loops"] == 1  # sub/up (self, sub/a, b: no .txt names)


def test_empty_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        corpus.list_files(tiny(path=str(tmp_path / "nothing*.txt")).data)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(DataError, match=r"no documents \(non_utf8_files=1\)"):
        build_data(tiny(path=str(tmp_path)), tmp_path / "work")


def test_jsonl_text_field(tmp_path):
    lines = [json.dumps({"body": f"record {i} " * 5, "id": i}) for i in range(10)]
    lines[3] = "{not json"
    lines[5] = json.dumps({"other": "no body here"})
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    c = tiny(source="jsonl", path=str(tmp_path / "data.jsonl"), text_field="body").data
    result = corpus.load_corpus(c, progress=False)
    assert result.stats["documents"] == 8
    assert result.stats["skipped"]["malformed_records"] == 1
    assert result.stats["skipped"]["records_without_field"] == 1
    assert sorted(result.train + result.validation) == sorted(f"record {i} " * 5 for i in range(10) if i not in (3, 5))
    assert len(result.validation) == 2  # 20% of 8 records
    c.text_field = "text"
    with pytest.raises(DataError, match="'text'"):
        corpus.load_corpus(c, progress=False)


def test_single_file_is_split_inside_the_text(tmp_path):
    (tmp_path / "book.txt").write_text("".join(DOCS))
    c = tiny(path=str(tmp_path / "book.txt")).data
    result = corpus.load_corpus(c, progress=False)
    assert result.train[0] + result.validation[0] == "".join(DOCS)
    assert result.validation[0] and result.validation[0].startswith("document")


def test_stdlib_split_is_deterministic_and_disjoint():
    c = tiny(source="stdlib", max_files=30).data
    first, second = corpus.list_files(c), corpus.list_files(c)
    assert first.files == second.files and len(first.files) == 30
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in first.files)
    docs, _ = corpus.read_documents(first, c, progress=False)
    train, val = corpus.split_documents(docs, 0.2)
    train2, val2 = corpus.split_documents(list(reversed(docs)), 0.2)  # input order does not matter
    assert (train, val) == (train2, val2)
    assert len(val) == round(0.2 * len(docs)) and not set(train) & set(val)
    assert sorted(train + val) == sorted(t for _, t in docs)


# ---- build_data end to end ------------------------------------------------------------------------

def test_build_data_end_to_end_cache_and_resume(text_dir, tmp_path):
    config, work = tiny(path=str(text_dir)), tmp_path / "work"
    data = build_data(config, work)
    tok = data.tokenizer
    assert (tok.pad_id, tok.eos_id) == (0, 1) and tok.vocab_size <= config.model.vocab_size
    assert tok.decode(tok.encode(DOCS[3])) == DOCS[3]
    assert (work / "tokenizer.model").is_file()
    assert data.stats["cache_hit"] is False and data.stats["documents"] == len(DOCS)
    assert data.stats["train_tokens"] > 0 and data.stats["validation_tokens"] > 0
    assert 1 <= len(data.eval_batches) <= config.train.eval_batches

    batch = next(data.train)
    assert batch["inputs"].shape == (2, 16) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    # text between eos tokens is whole documents
    stream = np.concatenate([b["inputs"][0] for b in data.eval_batches] + [data.eval_batches[-1]["targets"][0, -1:]])
    pieces = tok.decode(stream).split("\n")  # docs end with newline; check words survive packing
    assert any(p.startswith("document") for p in pieces)
    for _ in range(3):
        next(data.train)
    state = json.loads(json.dumps(data.train.get_state()))
    expected = [next(data.train) for _ in range(4)]

    resumed = build_data(config, work)  # a new process would do exactly this
    assert resumed.stats["cache_hit"] is True
    resumed.train.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed.train)["inputs"], want["inputs"])
    for a, b in zip(resumed.eval_batches, data.eval_batches):
        np.testing.assert_array_equal(a["targets"], b["targets"])
    assert not [p for p in os.listdir(work / "data_cache") if p.endswith(".tmp")]

    # a crash between writing the arrays and the meta file: the arrays are not trusted
    for meta in (work / "data_cache").glob("*.json"):
        meta.unlink()
    assert build_data(config, work).stats["cache_hit"] is False

    # a workdir inside the corpus directory is not read as corpus
    inside = build_data(config, text_dir / "work")
    assert build_data(config, text_dir / "work").stats["cache_hit"] is True
    assert inside.stats["files"] == len(DOCS)

    # editing a file changes the cache key: the stale token cache is not reused
    (text_dir / "doc0.txt").write_text(DOCS[0] + "an added line\n")
    changed = build_data(config, work)
    assert changed.stats["cache_hit"] is False
    with pytest.raises(DataError, match="different corpus"):
        changed.train.set_state(state)


def test_eos_separates_documents_in_the_stream(tmp_path):
    texts = ["alpha beta gamma", "gamma alpha", "beta beta gamma alpha"]  # one alphabet: no unk
    for name, text in zip("abc", texts):
        (tmp_path / f"{name}.txt").write_text(text)
    config = tiny(path=str(tmp_path), validation_fraction=0.3)
    config.train.update(seq_len=4, batch_size=1, eval_batches=8)
    data = build_data(config, tmp_path / "work")
    tok = data.tokenizer

    def documents(stream):
        assert stream[-1] == tok.eos_id
        return [tok.decode(part[:-1]) for part in np.split(stream, np.where(stream == tok.eos_id)[0] + 1)[:-1]]

    train_docs = documents(data.train.stream.astype(np.int64))
    # the validation stream, reassembled from the eval batches' weighted targets
    val = [data.eval_batches[0]["inputs"][0, 0]]
    for b in data.eval_batches:
        val.extend(b["targets"][b["weights"] > 0])
    val_docs = documents(np.asarray(val))
    assert len(train_docs) == 2 and len(val_docs) == 1
    assert sorted(train_docs + val_docs) == sorted(texts)
    # training rows are contiguous slices of that stream
    row = next(data.train)["inputs"][0]
    stream = data.train.stream.astype(np.int64)
    assert any(np.array_equal(stream[i:i + 4], row) for i in range(len(stream) - 3))


def test_interrupted_cache_write_leaves_nothing(tmp_path):
    target = tmp_path / "data_cache" / "x.train.npy"

    def write_then_crash(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache._atomic(target, write_then_crash)
    assert not target.exists() and os.listdir(target.parent) == []
    cache.save_array(target, np.arange(5, dtype=np.uint16))
    np.testing.assert_array_equal(cache.load_array(target), np.arange(5))


def test_data_modules_do_not_import_tensorflow():
    code = ("import sys; import scaling_sparse.data.pipeline, scaling_sparse.data.tokenizer; "
            "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
