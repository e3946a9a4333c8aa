"""Local corpora: the embedded stdlib sources, text files, JSONL; the train/validation split.

A corpus is a list of documents (key, text). The key (a file's path relative to the corpus root, or
"file:line" for a JSONL record) decides the split: documents are ordered by a hash of their key and
the first `validation_fraction` of them are the validation split. The split is therefore
deterministic, disjoint, independent of the machine's file order, and stable when files are added.
Unreadable, non-UTF-8 or malformed inputs are skipped and counted, never a crash mid-run; so are
directories that cannot be listed and symbolic links that loop (a link to itself, or a directory link
back onto a directory above it). Other directory links are followed.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import glob
import hashlib
import json
import os
import pathlib
import sysconfig

from tqdm import tqdm

from scaling_sparse.data import DataError


@dataclasses.dataclass
class SourceFiles:
    """The files of a corpus, in split order, with what identifies their contents for caching."""

    root: pathlib.Path
    files: list[pathlib.Path]
    # What listing skipped: {"symlink_loops": n, "unreadable_dirs": n}; read_documents adds them to
    # the corpus's skip counts.
    skipped: dict = dataclasses.field(default_factory=lambda: _listing_skips())

    def keys(self) -> list[str]:
        return [_rel(f, self.root) for f in self.files]

    def signature(self) -> list:
        """(key, size, mtime) of every file: a changed file changes every cache key built from it."""
        sig = []
        for f in self.files:
            try:
                st = f.stat()
                sig.append([_rel(f, self.root), st.st_size, st.st_mtime_ns])
            except OSError:
                sig.append([_rel(f, self.root), -1, -1])
        return sig


@dataclasses.dataclass
class Corpus:
    train: list        # str documents, or (input, target) pairs for prefix-LM
    validation: list
    stats: dict


def _rel(path: pathlib.Path, root: pathlib.Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _hash_key(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()


def stdlib_root() -> pathlib.Path:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"data.source=stdlib: the interpreter's standard library was not found at {root}. "
                        "Fix: use --config.data.source=files --config.data.path=DIR with your own text.")
    return root


def _listing_skips() -> dict:
    return {"symlink_loops": 0, "unreadable_dirs": 0}


def _is_symlink_loop(path) -> bool:
    """A link that cannot be resolved because it loops (ELOOP), e.g. `a -> a` or `a -> b -> a`."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _regular_or_dangling(path: pathlib.Path) -> bool:
    # Broken symlinks are kept so they are counted as unreadable; FIFOs/sockets would block a read.
    return path.is_file() or (path.is_symlink() and not path.exists())


def _walk(directory: pathlib.Path, suffix: str | None, skipped: dict) -> list[pathlib.Path]:
    """Files under `directory` (hidden names and __pycache__ left out), following directory links
    except those that loop; loops and directories that cannot be listed are counted in `skipped`."""
    out = []

    def unreadable(error: OSError) -> None:
        skipped["unreadable_dirs"] += 1

    def dir_id(path) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    # The directories (device, inode) on the way down to each directory being walked: a link to one
    # of them would walk the same tree again, forever.
    above = {str(directory): frozenset(filter(None, [dir_id(directory)]))}
    for dirpath, dirnames, filenames in os.walk(directory, onerror=unreadable, followlinks=True):
        chain = above.pop(dirpath, frozenset())
        kept = []
        for d in dirnames:
            if d.startswith(".") or d == "__pycache__":
                continue
            sub = os.path.join(dirpath, d)
            ident = dir_id(sub)
            if ident is None:  # listed a moment ago, gone or inaccessible now
                skipped["unreadable_dirs"] += 1
                continue
            if ident in chain:
                skipped["symlink_loops"] += 1
                continue
            above[sub] = chain | {ident}
            kept.append(d)
        dirnames[:] = kept
        for name in filenames:
            if name.startswith(".") or (suffix and not name.endswith(suffix)):
                continue
            p = pathlib.Path(dirpath) / name
            if _is_symlink_loop(p):
                skipped["symlink_loops"] += 1
            elif _regular_or_dangling(p):
                out.append(p)
    return out


def _glob_files(pattern: str, skipped: dict) -> list[pathlib.Path]:
    """glob's matches (recursive `**` follows directory links) without the paths that run through a
    looping directory link: each such link is counted once, the files are not read."""

    @functools.lru_cache(maxsize=None)
    def chain(directory: str) -> tuple[frozenset, str | None]:
        """-> (real paths of `directory` and the directories above it, the first looping link)."""
        parent = os.path.dirname(directory)
        if not parent or parent == directory:
            return frozenset([os.path.realpath(directory or ".")]), None
        above, loop = chain(parent)
        real = os.path.realpath(directory)
        if loop is None and os.path.islink(directory) and real in above:
            loop = directory
        return above | {real}, loop

    files, loops = [], set()
    for match in glob.glob(os.path.expanduser(pattern), recursive=True):
        path = pathlib.Path(match)
        loop = chain(os.path.dirname(os.path.abspath(match)))[1]
        if loop is not None:
            loops.add(loop)
        elif _is_symlink_loop(path):
            loops.add(match)
        elif _regular_or_dangling(path):
            files.append(path)
    skipped["symlink_loops"] += len(loops)
    return files


def list_files(data_config, exclude=None) -> SourceFiles:
    """The files of config.data's corpus in split order (hash of key), limited to max_files.

    `exclude` (the workdir) is left out, so a corpus directory that holds the workdir does not
    swallow its own token cache and checkpoints.
    """
    source, path = data_config.source, data_config.path
    skipped = _listing_skips()
    if source == "stdlib":
        root = stdlib_root()
        files = [f for f in _walk(root, ".py", skipped) if "site-packages" not in f.relative_to(root).parts]
    elif source in ("files", "jsonl"):
        p = pathlib.Path(os.path.expanduser(path))
        if p.is_dir():
            root = p
            files = _walk(p, ".jsonl" if source == "jsonl" else None, skipped)
        elif p.is_file():
            root, files = p.parent, [p]
        else:
            files = _glob_files(path, skipped)
            # Keys relative to the glob's fixed prefix, so moving the corpus keeps the split.
            root = pathlib.Path(os.path.commonpath([str(m.parent) for m in files])) if files else p.parent
    else:
        raise DataError(f"data.source={source!r} is not a local corpus. Fix: use stdlib | files | jsonl.")
    if exclude is not None:
        # os.path.realpath, not Path.resolve: it does not raise on a link that loops.
        exclude = os.path.join(os.path.realpath(exclude), "")
        files = [f for f in files if not os.path.realpath(f).startswith(exclude)]
    if not files:
        detail = ", ".join(f"{k}={v}" for k, v in skipped.items() if v)
        raise DataError(f"data.path={path!r} (source={source}) matches no files"
                        f"{f' ({detail})' if detail else ''}: the corpus is empty. "
                        "Fix: point --config.data.path at a directory, a glob such as 'docs/**/*.txt', "
                        + ("or a .jsonl file." if source == "jsonl" else "or a text file."))
    files.sort(key=lambda f: _hash_key(_rel(f, root)))
    if data_config.max_files:
        files = files[: data_config.max_files]
    return SourceFiles(root=root, files=files, skipped=skipped)


def _read_text(path: pathlib.Path, skipped: dict) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        skipped["unreadable_files"] += 1
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        skipped["non_utf8_files"] += 1
        return None


def _jsonl_documents(path: pathlib.Path, key: str, text: str, fields: tuple[str, ...], skipped: dict):
    """(key, value) per record: the text field's string, or with two fields (prefix-LM) the
    (input, target) pair of strings. Records missing a field are skipped and counted."""
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped["malformed_records"] += 1
            continue
        values = [record.get(f) if isinstance(record, dict) else None for f in fields]
        if not all(isinstance(v, str) for v in values):
            skipped["records_without_field"] += 1
            continue
        if values[-1]:  # an empty input segment is allowed, an empty text/target is not
            yield f"{key}:{line_no}", values[0] if len(values) == 1 else tuple(values)


def jsonl_fields(data_config) -> tuple[str, ...]:
    """The JSONL fields a record must hold: (text_field,), or (input_field, target) for prefix-LM."""
    if data_config.input_field:
        return (data_config.input_field, data_config.target_field or data_config.text_field)
    return (data_config.text_field,)


def read_documents(source: SourceFiles, data_config, progress: bool = True):
    """-> (documents [(key, text)], skipped-counts dict). Never raises for a bad individual file."""
    skipped = {"unreadable_files": 0, "non_utf8_files": 0, "empty_files": 0,
               "malformed_records": 0, "records_without_field": 0, **_listing_skips(), **source.skipped}
    docs = []
    for f, key in tqdm(list(zip(source.files, source.keys())), desc="reading corpus", unit="file",
                       disable=not progress, leave=False):
        text = _read_text(f, skipped)
        if text is None:
            continue
        if data_config.source == "jsonl":
            docs.extend(_jsonl_documents(f, key, text, jsonl_fields(data_config), skipped))
        elif text.strip():
            docs.append((key, text))
        else:
            skipped["empty_files"] += 1
    if not docs:
        detail = ", ".join(f"{k}={v}" for k, v in skipped.items() if v) or "no text in any file"
        fix = (f"check that the records hold the string fields {list(jsonl_fields(data_config))} "
               "(--config.data.text_field, or input_field/target_field for prefix-LM)"
               if data_config.source == "jsonl"
               else "point --config.data.path at UTF-8 text files")
        raise DataError(f"the corpus (source={data_config.source}, path={data_config.path!r}, "
                        f"{len(source.files)} files) has no documents ({detail}). Fix: {fix}.")
    return docs, skipped


def split_documents(docs, validation_fraction: float) -> tuple[list, list]:
    """Documents ordered by hash of key; the first fraction (at least one) is validation.

    A corpus of one document (a single text file) is split inside the text instead, at the line
    boundary nearest to the fraction's end, so one book is still a usable corpus.
    """
    if len(docs) == 1 and isinstance(docs[0][1], str):
        text = docs[0][1]
        cut = int(len(text) * (1.0 - validation_fraction))
        newline = text.rfind("\n", 0, cut)
        cut = newline + 1 if newline > 0 else cut
        return [text[:cut]], [text[cut:]]
    docs = sorted(docs, key=lambda d: _hash_key(d[0]))
    if len(docs) == 1:
        raise DataError("the prefix-LM corpus has a single record: a validation split needs at least two. "
                        "Fix: add records to the JSONL file.")
    n_val = min(len(docs) - 1, max(1, round(validation_fraction * len(docs))))
    return [t for _, t in docs[n_val:]], [t for _, t in docs[:n_val]]


def _chars(docs) -> int:
    return sum(len(d) if isinstance(d, str) else sum(map(len, d)) for d in docs)


def load_corpus(data_config, progress: bool = True, source: SourceFiles | None = None) -> Corpus:
    source = source or list_files(data_config)
    docs, skipped = read_documents(source, data_config, progress)
    train, validation = split_documents(docs, data_config.validation_fraction)
    stats = {"files": len(source.files), "documents": len(docs), "train_documents": len(train),
             "validation_documents": len(validation), "train_chars": _chars(train),
             "validation_chars": _chars(validation), "skipped": skipped,
             "skipped_files": skipped["unreadable_files"] + skipped["non_utf8_files"] + skipped["symlink_loops"]}
    return Corpus(train=train, validation=validation, stats=stats)
