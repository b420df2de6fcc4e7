"""Pretraining documents read from files: text, JSONL, GCIDE dictionaries and folders of them.

``.txt`` / ``.txt.gz`` / ``.gz`` files hold documents separated by blank lines,
``.jsonl`` / ``.jsonl.gz`` files one ``{"text": ...}`` object per line, and a
GCIDE dictionary (``*.dict.dz``) one document per few entries.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
import zlib
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from ...listing import counted, listed
from ..errors import DatasetError, PathLike
from .gcide import GcideError, gcide_documents

__all__ = ["CORPUS_SUFFIXES", "CorpusError", "Documents", "corpus_files", "iter_documents"]


CORPUS_SUFFIXES = (".txt", ".txt.gz", ".gz", ".jsonl", ".jsonl.gz", ".dict.dz")
_LOOKED_FOR = ", ".join(f"*{suffix}" for suffix in CORPUS_SUFFIXES)


class CorpusError(DatasetError):
    """A corpus path is missing, unreadable, malformed or holds no text."""


# --------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------


def _file_kind(path: Path) -> str | None:
    """ "text", "jsonl" or "gcide" from the file name, None when unsupported."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".dict.dz"):
        return "gcide"
    if name.endswith((".txt", ".gz")):
        return "text"
    return None


def _as_path_list(paths: Sequence[PathLike] | PathLike) -> list[Path]:
    """A single path or a sequence of them as a list of Paths."""
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(path) for path in paths]


def _folder_files(folder: Path) -> list[Path]:
    """Usable corpus files under ``folder``, recursively, sorted; hidden ones skipped quietly, the
    others of other kinds with a note (a README.md beside the text)."""
    visible = [path for path in sorted(folder.rglob("*"))
               if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)]
    files = [path for path in visible if _file_kind(path) is not None]
    if not files:
        raise CorpusError(f"{folder}: folder has no corpus files (looked for {_LOOKED_FOR}, recursively)")
    if others := [path for path in visible if _file_kind(path) is None]:
        warnings.warn(f"{folder}: skipped {counted(len(others), 'non-corpus file')} (corpus files: {_LOOKED_FOR}), "
                      f"e.g. {others[0]}", stacklevel=2)
    return files


def corpus_files(paths: Sequence[PathLike] | PathLike) -> list[Path]:
    """The corpus files named by ``paths`` (files, or folders searched recursively)."""
    path_list = _as_path_list(paths)
    if not path_list:
        raise CorpusError("no corpus paths given")
    files: list[Path] = []
    for path in path_list:
        if path.is_dir():
            files.extend(_folder_files(path))
        elif path.is_file():
            if _file_kind(path) is None:
                raise CorpusError(f"{path}: unsupported corpus file type (expected one of {_LOOKED_FOR})")
            files.append(path)
        elif path.exists():  # a device or a pipe (<(zcat ...)): read twice (tokenizer, then corpus), it would be empty
            raise CorpusError(f"{path}: not a regular file or a folder (a pipe or a device is read more than once; "
                              "save the text to a file)")
        else:
            raise CorpusError(f"{path}: corpus path not found (expected a folder or a {_LOOKED_FOR} file)")
    return _each_once(files)


def _each_once(files: list[Path]) -> list[Path]:
    """`files` without repeats (the same file named twice, or inside a folder also named): read
    twice, its documents would be trained on twice and could land on both sides of the held-out split."""
    seen: dict[Path, Path] = {}
    for file in files:
        first = seen.get(file.resolve())
        if first is None:
            seen[file.resolve()] = file
            continue
        also = f" (also as {first})" if str(first) != str(file) else ""
        warnings.warn(f"{file} is in the corpus more than once{also}; it is read once")
    return list(seen.values())


def _open_text(path: Path) -> Any:
    """A UTF-8 text handle on ``path``, gunzipping ``*.gz`` files."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _text_documents(path: Path) -> Iterator[str]:
    """Documents of a plain-text file: runs of lines separated by blank lines."""
    lines: list[str] = []
    with _open_text(path) as handle:
        for line in handle:
            if line.strip():
                lines.append(line.rstrip("\r\n"))
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def _jsonl_documents(path: Path) -> Iterator[str]:
    """The ``"text"`` field of every line of a JSON-lines file."""
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{number}: invalid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CorpusError(f'{path}:{number}: expected a JSON object with a string "text" field')
            yield record["text"]


def _where_not_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 lies: " on line N, byte B of the line" (read again in
    binary, line by line: a newline byte is never part of a multi-byte character)."""
    try:
        with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return f" on line {number}, byte {exc.start + 1} of the line"
    except (OSError, EOFError, zlib.error):
        pass
    return ""


def _file_documents(path: Path) -> Iterator[str]:
    """Documents of one corpus file, with read errors turned into CorpusError."""
    kind = _file_kind(path)
    try:
        if kind == "gcide":
            yield from gcide_documents(path)
        elif kind == "jsonl":
            yield from _jsonl_documents(path)
        else:
            yield from _text_documents(path)
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not UTF-8 text ({exc.reason}{_where_not_utf8(path)})") from None
    except GcideError as exc:
        raise CorpusError(str(exc)) from None
    except (OSError, EOFError, zlib.error) as exc:
        raise CorpusError(f"{path}: cannot read file ({exc})") from None


def iter_documents(paths: Sequence[PathLike] | PathLike) -> Iterator[str]:
    """Yield every non-empty document of the corpus named by ``paths``, in order.

    Raises CorpusError for a missing path, a folder without corpus files, a
    malformed file (naming ``file:line`` for JSON lines) or a corpus without
    any text.
    """
    files = corpus_files(paths)
    found = 0
    for path in files:
        for document in _file_documents(path):
            document = document.strip()
            if document:
                found += 1
                yield document
    if not found:
        raise CorpusError(f"no text found in the corpus ({listed(files)}); looked for documents in {_LOOKED_FOR} files")


class Documents:
    """The first `limit` documents of iter_documents(paths) (all: None), read afresh from the files on
    every pass (what a tokenizer's two-pass training reads without holding the corpus in memory)."""

    def __init__(self, paths: Sequence[PathLike] | PathLike, limit: int | None = None) -> None:
        self.paths, self.limit = paths, limit

    def __iter__(self) -> Iterator[str]:
        return islice(iter_documents(self.paths), self.limit)
