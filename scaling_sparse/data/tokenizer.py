"""SentencePiece tokenizer: trained on the training split and cached, or loaded from a .model file.

Id layout is T5's: pad 0, eos 1, unk 2, no bos. Trained models keep text byte-exact (identity
normalisation, whitespace kept, newline a piece of its own, byte fallback for unseen characters when
the vocabulary has room), so `decode(encode(text)) == text` for source code as well as prose.

Sentinels (config.data.objective="span_corruption", docs/semantics.md "Span corruption (T5)"):
`Tokenizer.sentinel_ids[i]` is the id of the piece `<extra_id_i>` (seqio spells it `▁<extra_id_i>`),
appended sentinel i at id vocab_size - 1 - i as in T5. K = `sentinel_count(model.vocab_size)` sentinels
(min(100, vocab_size // 8)) are reserved only for that objective, as USER_DEFINED pieces:
  - a trained tokenizer learns vocab_size - K pieces and gets the K sentinels appended on top
    (the K is part of its WORKDIR/tokenizer.json request, so an lm tokenizer is never reused);
  - a given .model that has `<extra_id_N>` pieces is used as it is;
  - a given .model without them (T5's 32000-piece spm) gets them appended above its pieces when
    model.vocab_size has room (T5 / seqio's 32100-id vocabulary: extra_id_0 = 32099), else they
    overwrite its K highest-id (rarest) multi-character NORMAL pieces, which encode() then never
    produces (text still encodes, into shorter pieces): what trax did for the paper's C4 runs with
    vocab_size 32000 (sentinels 31999, 31998, ...; trax left those pieces in the text too).
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pathlib
import time
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from scaling_sparse import storage
from scaling_sparse.data import DataError, cache, corpus

log = logging.getLogger(__name__)

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# What a trained tokenizer leaves in its workdir: the model, and the request it was trained for.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# Byte fallback costs 256 pieces; below this vocabulary size unseen characters map to unk instead.
_BYTE_FALLBACK_MIN_VOCAB = 1024
MAX_SENTINELS = 100  # T5's extra ids


def sentinel_count(vocab_size: int) -> int:
    """Sentinels reserved for span corruption: T5's 100, at most 1/8 of a small vocabulary (8 of the
    tests' 64 pieces)."""
    return max(1, min(MAX_SENTINELS, vocab_size // 8))


def config_sentinels(config) -> int:
    """The sentinels config asks the tokenizer for: sentinel_count(model.vocab_size) for span
    corruption, none for the language-model objective."""
    if config.data.get("objective", "lm") != "span_corruption":
        return 0
    return sentinel_count(config.model.vocab_size)


def _sentinel_piece(i: int, dummy_prefix: bool) -> str:
    return f"\u2581<extra_id_{i}>" if dummy_prefix else f"<extra_id_{i}>"


def find_sentinels(sp) -> tuple[int, ...]:
    """Ids of the pieces <extra_id_0>, <extra_id_1>, ... (or seqio's ▁<extra_id_i>) up to the first missing."""
    ids = []
    while True:
        for piece in (_sentinel_piece(len(ids), False), _sentinel_piece(len(ids), True)):
            i = sp.piece_to_id(piece)
            if i != sp.unk_id() and sp.id_to_piece(i) == piece:
                ids.append(i)
                break
        else:
            return tuple(ids)


def add_sentinels(model_proto: bytes, count: int, max_vocab: int | None, where: str = "") -> bytes:
    """The model with `count` sentinel pieces `<extra_id_i>` (USER_DEFINED), sentinel i at the
    (new) vocabulary size - 1 - i; unchanged if it already has <extra_id_0>.

    Appended above the model's pieces when max_vocab has room for them (T5 / seqio's layout),
    else written over the `count` highest-id multi-character NORMAL pieces (T5's original convention: "we
    appropriate the last tokens in the vocabulary", trax's with vocab 32000). The piece is spelled
    seqio's way, `▁<extra_id_i>`, in models that add a dummy whitespace prefix (T5's), else
    `<extra_id_i>`.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    if count <= 0 or find_sentinels(spm.SentencePieceProcessor(model_proto=model_proto)):
        return model_proto
    model = pb.ModelProto.FromString(model_proto)
    dummy = model.normalizer_spec.add_dummy_prefix
    n = len(model.pieces)
    if max_vocab is None or n + count <= max_vocab:
        for i in reversed(range(count)):
            model.pieces.add(piece=_sentinel_piece(i, dummy), score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    else:
        # Multi-character pieces only: every character keeps a piece, so all text still encodes (into
        # shorter pieces where an overwritten one was used).
        normal = [j for j in range(n - 1, -1, -1) if model.pieces[j].type == pb.ModelProto.SentencePiece.NORMAL
                  and len(model.pieces[j].piece) > 1]
        if len(normal) < count:
            raise DataError(f"tokenizer {where}: {n} pieces leave no room for {count} span-corruption sentinels. "
                            f"Fix: raise --config.model.vocab_size to {n + count}.")
        for i, j in enumerate(normal[:count]):
            model.pieces[j].piece = _sentinel_piece(i, dummy)
            model.pieces[j].type = pb.ModelProto.SentencePiece.USER_DEFINED
            model.pieces[j].score = 0.0
        log.warning("tokenizer %s: %d span-corruption sentinels overwrite its %d rarest pieces (ids %d..%d): "
                    "text encodes into shorter pieces there, "
                    "as trax did with T5's 32000 pieces; with --config.model.vocab_size=%d they would be "
                    "added above them instead (T5's layout)", where, count, count, normal[count - 1], normal[0],
                    n + count)
    return model.SerializeToString()


class Tokenizer:
    """A thin wrapper over SentencePieceProcessor with batch (multithreaded) encoding."""

    def __init__(self, model_proto: bytes, path: str = ""):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.path = str(path)
        self.model_proto = model_proto
        where = path or "the given SentencePiece model"
        for name, got, want in (("pad", self.sp.pad_id(), PAD_ID), ("eos", self.sp.eos_id(), EOS_ID)):
            if got != want:
                raise DataError(f"tokenizer {where}: {name} id is {got}, expected {want} (T5's layout: pad 0, "
                                "eos 1, unk 2). Fix: use a model trained with --pad_id=0 --eos_id=1 --unk_id=2 "
                                "--bos_id=-1, or leave config.data.tokenizer_path empty to train one.")
        # sentinel_ids[i]: the id of <extra_id_i> (span corruption); () when the model has none.
        self.sentinel_ids = find_sentinels(self.sp)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.sp.decode(ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes many texts on all cores (SentencePiece's own thread pool)."""
        return self.sp.encode(list(texts), num_threads=os.cpu_count() or 1)


def load_tokenizer(path, max_vocab: int | None = None, sentinels: int = 0) -> Tokenizer:
    path = pathlib.Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise DataError(f"config.data.tokenizer_path={str(path)!r} does not exist. Fix: give a SentencePiece "
                        ".model file, or leave it empty to train one on the training split.")
    try:
        proto = path.read_bytes()
        if sentinels:
            proto = add_sentinels(proto, sentinels, max_vocab, str(path))
        tok = Tokenizer(proto, str(path))
    except (RuntimeError, OSError) as e:
        raise DataError(f"config.data.tokenizer_path={str(path)!r} is not a readable SentencePiece model "
                        f"({e}). Fix: give a .model file written by SentencePiece.") from e
    check_vocab(tok, max_vocab)
    return tok


def check_vocab(tok: Tokenizer, max_vocab: int | None) -> None:
    if max_vocab is not None and tok.vocab_size > max_vocab:
        raise DataError(f"tokenizer {tok.path or ''} has {tok.vocab_size} pieces, more than "
                        f"config.model.vocab_size={max_vocab}: its ids would index past the embedding. "
                        f"Fix: set --config.model.vocab_size={tok.vocab_size} (or larger).")


# SentencePiece drops (does not cut) every training sentence longer than this many bytes, its
# max_sentence_length default: a corpus of one long line (minified code, a file without newlines)
# would leave it nothing to train on. Longer lines are cut into pieces below the limit.
MAX_SENTENCE_BYTES = 4192


def _lines(text: str) -> Iterator[str]:
    """text.split("\n"), lazily: only the lines the character budget reaches are copied."""
    start = 0
    while start <= len(text):
        end = text.find("\n", start)
        if end < 0:
            end = len(text)
        yield text[start:end]
        start = end + 1


def split_long_line(line: str, max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """The line, or pieces of at most max_bytes UTF-8 bytes cut before a space where there is one in
    the piece's second half (a word stays whole; the space starts the next piece, as it starts a
    word's piece in the vocabulary)."""
    if len(line) * 4 <= max_bytes or (len(line) <= max_bytes and len(line.encode("utf-8")) <= max_bytes):
        yield line
        return
    start = 0
    while start < len(line):
        end = min(len(line), start + max_bytes)
        while len(line[start:end].encode("utf-8")) > max_bytes:  # multi-byte characters
            end = start + max(1, (end - start) * 3 // 4)
        if end < len(line):
            cut = line.rfind(" ", start + (end - start) // 2, end)
            end = cut if cut > start else end
        yield line[start:end]
        start = end


def training_sentences(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-blank lines of the texts, long ones cut into pieces SentencePiece keeps
    (`split_long_line`), up to max_chars characters in all: SentencePiece's input."""
    total = 0
    for text in texts:
        for line in _lines(text):
            if not line.strip():
                continue
            for piece in split_long_line(line):
                if not piece.strip():
                    continue
                yield piece
                total += len(piece)
                if total >= max_chars:
                    return


_USER_SYMBOLS = ["\n"]


def _byte_fallback(vocab_size: int) -> bool:
    return vocab_size >= _BYTE_FALLBACK_MIN_VOCAB


def fit_alphabet(sentences: list[str], vocab_size: int) -> list[str]:
    """Drops the rarest characters when the vocabulary cannot hold them all.

    SentencePiece needs one piece per kept character (its coverage floor is 0.98), so a tiny
    vocabulary (the 64-piece test preset) would fail on a corpus of ~100 distinct characters. Keeping
    the most frequent characters, with a quarter of the vocabulary left for merges, makes the rest
    unk at encode time instead.
    """
    free = vocab_size - 3 - len(_USER_SYMBOLS) - (256 if _byte_fallback(vocab_size) else 0)
    keep = max(1, free - free // 4)
    counts = collections.Counter()
    for sentence in sentences:
        counts.update(sentence)
    if len(counts) <= keep:
        return sentences
    drop = {ord(ch): None for ch, _ in counts.most_common()[keep:]}
    log.info("vocabulary of %d keeps the %d most frequent of %d characters", vocab_size, keep, len(counts))
    return [t for t in (sentence.translate(drop) for sentence in sentences) if t.strip()]


def _train_proto(sentences: list[str], vocab_size: int) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        # Keep text byte-exact: no NFKC, no whitespace collapsing, newline as a piece.
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=_USER_SYMBOLS,
        byte_fallback=_byte_fallback(vocab_size), character_coverage=0.9995,
        # A small corpus may not fill the vocabulary; fewer pieces is fine (ids stay < vocab_size).
        hard_vocab_limit=False, max_sentence_length=MAX_SENTENCE_BYTES, num_threads=os.cpu_count() or 1,
        minloglevel=2)
    return buf.getvalue()


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_chars: int) -> Tokenizer:
    """Trains a SentencePiece BPE model on at most max_chars characters of the texts.

    BPE, not unigram: on the stdlib corpus (3M characters, 4096 pieces, 2 cores) it trained in
    4 s against unigram's 33 s and encoded the validation split in 3% fewer tokens.
    """
    sentences = fit_alphabet(list(training_sentences(texts, max_chars)), vocab_size)
    if not sentences:
        raise DataError("the training split has no text to train a tokenizer on. Fix: add text to the corpus "
                        "or give --config.data.tokenizer_path=MODEL.")
    start = time.time()
    log.info("training a %d-piece SentencePiece tokenizer on %d characters", vocab_size,
             sum(map(len, sentences)))
    try:
        proto = _train_proto(sentences, vocab_size)
    except RuntimeError as e:
        raise DataError(f"SentencePiece could not train a {vocab_size}-piece vocabulary on this corpus ({e}). "
                        "Fix: raise --config.model.vocab_size or give --config.data.tokenizer_path=MODEL.") from e
    log.info("tokenizer trained in %.1f s", time.time() - start)
    return Tokenizer(proto)


def cached_or_trained(workdir, request: dict, vocab_size: int, max_chars: int, train_texts,
                      sentinels: int = 0) -> Tokenizer:
    """WORKDIR/tokenizer.model if present (checked against `request`), else trained and saved there.

    `request` (source, path, vocab size, ...) is stored beside the model; a workdir reused with a
    different corpus or vocabulary is an error rather than a silently mismatched tokenizer.
    `train_texts` is a zero-argument callable: the corpus is read only when training is needed.
    `sentinels` > 0: vocab_size - sentinels pieces are learned and the sentinels appended on top.
    """
    workdir = storage.path(workdir)
    model_path, meta_path = (workdir / name for name in TOKENIZER_FILES)
    if model_path.is_file():
        if meta_path.is_file():
            stored = {k: v for k, v in read_tokenizer_meta(workdir).items() if k != UNKNOWN_SHARE_KEY}
            if stored != request:
                diff = {k: (stored.get(k), request.get(k)) for k in set(stored) | set(request)
                        if stored.get(k) != request.get(k)}
                raise DataError(f"{model_path} was trained for a different data config (stored vs now: {diff}). "
                                "Fix: use a fresh --workdir, or delete tokenizer.model there to retrain "
                                "(checkpoints in that workdir belong to the old tokenizer).")
        tok = _workdir_tokenizer(model_path)
        check_vocab(tok, vocab_size)
        return tok
    tok = train_tokenizer(train_texts(), vocab_size - sentinels, max_chars)
    if sentinels:
        tok = Tokenizer(add_sentinels(tok.model_proto, sentinels, vocab_size))
    cache.write_bytes(model_path, tok.model_proto)
    cache.write_json(meta_path, request)
    tok.path = str(model_path)
    return tok


def _workdir_tokenizer(model_path: pathlib.Path) -> Tokenizer:
    """WORKDIR/tokenizer.model; a DataError naming the fix when it is empty or damaged (truncated)."""
    proto = model_path.read_bytes()
    try:
        if not proto:
            raise RuntimeError("the file is empty")
        return Tokenizer(proto, str(model_path))
    except RuntimeError as e:
        raise DataError(
            f"{model_path} is damaged ({str(e).strip().splitlines()[0][:200]}; {len(proto)} bytes): the checkpoints "
            f"in {model_path.parent} belong to the tokenizer that was there, so it is not retrained over it. Fix: "
            "restore tokenizer.model from a copy of this work directory; or, if no checkpoint there is worth "
            "keeping, delete tokenizer.model and tokenizer.json and train again (a new tokenizer is trained)") from None


def read_tokenizer_meta(workdir) -> dict:
    """WORKDIR/tokenizer.json ({} when absent); a DataError naming the fix when it is damaged."""
    meta_path = storage.path(workdir) / TOKENIZER_FILES[1]
    if not meta_path.is_file():
        return {}
    try:
        meta = cache.read_json(meta_path)
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        return meta
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(
            f"{meta_path} is damaged ({type(e).__name__}: {str(e)[:160]}): it records what tokenizer.model was "
            "trained on, checked each time it is reused. Fix: restore it from a copy of this work directory, or "
            "delete it to use tokenizer.model as it is, unchecked") from None


def tokenizer_request(config) -> dict:
    """What a trained WORKDIR/tokenizer.model was made from (checked when it is reused)."""
    d = config.data
    request = {"source": d.source, "path": d.path if d.source != "tfds" else d.tfds_name,
               "text_field": list(corpus.jsonl_fields(d)) if d.source == "jsonl" else "", "max_files": d.max_files,
               "validation_fraction": d.validation_fraction, "vocab_size": config.model.vocab_size,
               "tokenizer_train_chars": d.tokenizer_train_chars}
    if config_sentinels(config):  # only then: a language-model workdir's stored request stays valid
        request["sentinels"] = config_sentinels(config)
    return request


# tokenizer.json also records the share of <unk> in the training split the first time that split was
# encoded with the tokenizer trained there; a later encoding with far more is text it was not trained on.
UNKNOWN_SHARE_KEY = "train_unknown_share"


def record_unknown_share(workdir, share: float) -> None:
    meta_path = storage.path(workdir) / TOKENIZER_FILES[1]
    cache.write_json(meta_path, {**read_tokenizer_meta(workdir), UNKNOWN_SHARE_KEY: round(share, 6)})


def recorded_unknown_share(workdir) -> float:
    """The recorded share (0 for a tokenizer.json written before it was recorded)."""
    return float(read_tokenizer_meta(workdir).get(UNKNOWN_SHARE_KEY, 0.0))


def get_tokenizer(config, workdir, train_texts=None) -> Tokenizer:
    """The run's tokenizer: config.data.tokenizer_path, else WORKDIR/tokenizer.model, trained on
    train_texts() if absent (without train_texts, e.g. for generate, a missing one is an error)."""
    d = config.data
    if d.tokenizer_path:
        return load_tokenizer(d.tokenizer_path, config.model.vocab_size, config_sentinels(config))
    if train_texts is None:
        def train_texts():
            raise FileNotFoundError(f"no tokenizer in {workdir}: train there first, or set "
                                    "--config.data.tokenizer_path=MODEL")
    return cached_or_trained(workdir, tokenizer_request(config), config.model.vocab_size,
                             d.tokenizer_train_chars, train_texts, config_sentinels(config))
