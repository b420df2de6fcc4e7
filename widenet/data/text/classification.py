"""GLUE-style sentence(-pair) classification: reading task files and encoding them.

Text is encoded with ``add_special_tokens=False`` and ``[CLS]``/``[SEP]`` are
placed here, so truncation stays under our control. Every malformed input
raises :class:`TaskDataError` whose message starts with the file (and line)
at fault.

Shape legend: N examples, L the padded length (the longest encoded sequence,
at most ``max_len``).
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...settings import repeated
from ..errors import PathLike
from .task_common import TaskDataError, at, pad_rows
from .tokenizer import special_ids

__all__ = ["LABEL_COLUMNS", "TEXT_PAIR_COLUMNS", "TEXT_SINGLE_COLUMNS", "ClassificationExample", "check_labels", "check_same_form", "encode_classification", "label_vocabulary", "read_classification", "read_classification_task"]


# Recognised column names, in order of preference. Pairs come first so that
# QNLI's (question, sentence) is not read as a single-sentence task.
TEXT_PAIR_COLUMNS: tuple[tuple[str, str], ...] = (
    ("sentence1", "sentence2"),  # MNLI, RTE, MRPC-like, STS-B
    ("question1", "question2"),  # QQP
    ("question", "sentence"),  # QNLI
    ("premise", "hypothesis"),  # JSONL NLI
)
TEXT_SINGLE_COLUMNS: tuple[str, ...] = ("sentence", "text")  # SST-2, CoLA-like, JSONL
LABEL_COLUMNS: tuple[str, ...] = ("gold_label", "label", "is_duplicate")


@dataclass
class ClassificationExample:
    """One sentence (pair) and its label string (``None`` for unlabeled test data).

    ``line`` is where the example came from (1-based line in its file); it is
    only used in error messages and ignored by ``==``.
    """

    text_a: str
    text_b: str | None
    label: str | None
    line: int | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class _Schema:
    """Which columns of a file hold text_a, text_b and the label."""

    text_a: str
    text_b: str | None
    label: str | None


def _accepted_names() -> str:
    pairs = ", ".join(f"{a}+{b}" for a, b in TEXT_PAIR_COLUMNS)
    return f"text pairs {pairs}; single texts {', '.join(TEXT_SINGLE_COLUMNS)}"


def _schema(columns: Sequence[str], path: PathLike, line: int) -> _Schema:
    """Pick the text and label columns out of a header / the first record's keys."""
    names = set(columns)
    if len(names) < len(columns):  # a dict of the row would keep only the last of them
        twice = ", ".join(map(repr, repeated(columns)))
        raise TaskDataError(f"{at(path, line)}: column {twice} appears more than once in the header")
    label = next((c for c in LABEL_COLUMNS if c in names), None)
    for a, b in TEXT_PAIR_COLUMNS:
        if a in names and b in names:
            return _Schema(a, b, label)
    for a in TEXT_SINGLE_COLUMNS:
        if a in names:
            return _Schema(a, None, label)
    raise TaskDataError(
        f"{at(path, line)}: no recognised text column; found columns "
        f"{', '.join(map(repr, columns)) or '(none)'}; accepted names: {_accepted_names()}"
    )


def _label_string(value: Any, path: PathLike, line: int) -> str:
    """A label as a string: JSON ints become "0"/"1", bools "1"/"0"."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN / Infinity
        raise TaskDataError(f"{at(path, line)}: label {value!r} is not a class (a string or a finite number)")
    if isinstance(value, (int, float, str)):
        return str(value)
    raise TaskDataError(f"{at(path, line)}: label must be a string or number, got {value!r}")


def _example(record: dict[str, Any], schema: _Schema, path: PathLike, line: int) -> ClassificationExample:
    """Build one example from a row/record, rejecting missing or empty values."""
    wanted = [schema.text_a, schema.text_b, schema.label]
    for key in filter(None, wanted):
        value = record.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise TaskDataError(f"{at(path, line)}: missing value for column {key!r}")
    for key in filter(None, wanted[:2]):
        if not isinstance(record[key], str):
            raise TaskDataError(f"{at(path, line)}: column {key!r} must be text, got {record[key]!r}")
    label = None if schema.label is None else _label_string(record[schema.label], path, line)
    text_b = None if schema.text_b is None else record[schema.text_b]
    return ClassificationExample(record[schema.text_a], text_b, label, line=line)


def _read_delimited(path: Path, delimiter: str) -> list[ClassificationExample]:
    """TSV (quoting off: GLUE files hold unbalanced quotes) or CSV with a header row."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    examples: list[ClassificationExample] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header: list[str] | None = None
        schema: _Schema | None = None
        start = 1  # the line where the current record begins
        try:
            for row in reader:
                line, start = start, reader.line_num + 1
                if not row or all(not cell.strip() for cell in row):
                    continue
                if header is None:
                    header = [cell.strip() for cell in row]
                    schema = _schema(header, path, line)
                    continue
                if len(row) != len(header):
                    raise TaskDataError(
                        f"{at(path, line)}: expected {len(header)} fields (as in the header), got {len(row)}"
                    )
                examples.append(_example(dict(zip(header, row)), schema, path, line))
        except csv.Error as err:
            raise TaskDataError(f"{at(path, reader.line_num)}: unreadable row: {err}") from None
    if header is None:
        raise TaskDataError(f"{path}: file is empty")
    return examples


def _read_jsonl(path: Path) -> list[ClassificationExample]:
    """One JSON object per line; the first object's keys choose the columns."""
    examples: list[ClassificationExample] = []
    schema: _Schema | None = None
    with path.open(encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{at(path, line)}: bad JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"{at(path, line)}: expected a JSON object, got {type(record).__name__}")
            if schema is None:
                schema, first = _schema(list(record), path, line), line
            elif schema.label is None and (named := [k for k in LABEL_COLUMNS if k in record]):
                raise TaskDataError(f"{at(path, line)}: has {named[0]!r}, which the first record (line {first}) "
                                    "lacks: the first record's keys choose the columns, so give it a label too")
            examples.append(_example(record, schema, path, line))
    if schema is None:
        raise TaskDataError(f"{path}: file is empty")
    return examples


def read_classification(path: PathLike) -> list[ClassificationExample]:
    """Read a GLUE-style classification file (``.tsv``, ``.csv`` or ``.jsonl``).

    The header (or JSON keys) must name the text column(s): one of the pairs
    in :data:`TEXT_PAIR_COLUMNS` or a single column in
    :data:`TEXT_SINGLE_COLUMNS`. The label comes from the first of
    :data:`LABEL_COLUMNS` present; files without one (GLUE test files) give
    ``label=None``. Labels are kept as strings.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl"):
        raise TaskDataError(f"{path}: unsupported file type {suffix!r}; use .tsv, .csv or .jsonl")
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as err:
        raise TaskDataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def label_vocabulary(examples: Sequence[ClassificationExample]) -> list[str]:
    """The sorted unique labels of a (training) set; every example must have one."""
    for i, ex in enumerate(examples):
        if ex.label is None:
            where = f"line {ex.line}" if ex.line is not None else f"example {i}"
            raise TaskDataError(f"{where}: example has no label, cannot build a label vocabulary")
    if not examples:
        raise TaskDataError("cannot build a label vocabulary from zero examples")
    return sorted({ex.label for ex in examples})


def check_labels(examples: Sequence[ClassificationExample], labels: Sequence[str], path: PathLike) -> None:
    """Raise if an example of ``path`` has no label or one not in ``labels`` (the training labels)."""
    known = set(labels)
    for i, ex in enumerate(examples):
        where = at(path, ex.line) if ex.line is not None else f"{path} example {i}"
        if ex.label is None:
            raise TaskDataError(f"{where}: example has no label")
        if ex.label not in known:
            raise TaskDataError(
                f"{where}: label {ex.label!r} is not one of the training labels: {', '.join(map(repr, labels))}"
            )


def check_same_form(train: Sequence[ClassificationExample], other: Sequence[ClassificationExample],
                    train_path: PathLike, other_path: PathLike) -> None:
    """Raise unless both sets hold sentence pairs or both hold single sentences (a model trained
    on one form and scored on the other would give a meaningless accuracy)."""
    if not train or not other:
        return
    forms = ["sentence pairs" if examples[0].text_b is not None else "single sentences" for examples in (train, other)]
    if forms[0] != forms[1]:
        raise TaskDataError(f"{other_path} has {forms[1]} but {train_path} has {forms[0]}; "
                            "give both files the same text columns")


def read_classification_task(train_path: PathLike, validation_path: PathLike
                             ) -> tuple[list[ClassificationExample], list[ClassificationExample], list[str]]:
    """(training examples, validation examples, labels) of a task, checked as fine-tuning needs
    them: neither file empty, at least two training labels, the same text columns in both, and
    every validation label among the training ones."""
    train, validation = read_classification(train_path), read_classification(validation_path)
    for path, examples in ((train_path, train), (validation_path, validation)):
        if not examples:
            raise TaskDataError(f"{path}: no examples")
    if all(ex.label is None for ex in train):  # no label column: GLUE test files look like this
        raise TaskDataError(f"{train_path}: no label column; name it {' or '.join(LABEL_COLUMNS)} in the header")
    try:
        labels = label_vocabulary(train)
    except TaskDataError as err:  # it names the line, not the file
        raise TaskDataError(f"{train_path}: {err}") from None
    if len(labels) < 2:
        raise TaskDataError(f"{train_path}: every example has the label {labels[0]!r}; "
                            "classification needs at least two labels")
    _note_look_alike_labels(labels, train_path)
    _note_score_labels(labels, train_path)
    check_same_form(train, validation, train_path, validation_path)
    check_labels(validation, labels, validation_path)
    return train, validation, labels


def _note_look_alike_labels(labels: Sequence[str], path: PathLike) -> None:
    """Warn about labels that differ only in case or surrounding spaces ("pos" and "Pos "): kept
    as separate classes, as given, but more likely one class typed two ways."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(label.strip().casefold(), []).append(label)
    alike = [" and ".join(repr(name) for name in names) for names in groups.values() if len(names) > 1]
    if alike:
        warnings.warn(f"{path}: labels {'; '.join(alike)} differ only in case or spaces; "
                      "they are trained as separate classes", stacklevel=3)


def _note_score_labels(labels: Sequence[str], path: PathLike) -> None:
    """Warn when the labels are numbers with fractions (STS-B's similarity scores): fine-tuning
    classifies, so every distinct score becomes a class of its own."""
    try:
        values = [float(label) for label in labels]
    except ValueError:
        return
    fractions = [label for label, value in zip(labels, values) if not value.is_integer()]
    if fractions:
        warnings.warn(f"{path}: the labels are numbers, some with fractions ({fractions[0]!r}), as scores are; "
                      f"they are trained as {len(labels)} separate classes (fine-tuning classifies, it does not "
                      "regress)", stacklevel=3)


def _pair_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Longest-first truncation: repeatedly drop a token from the longer text
    (from text_b on a tie) until ``len_a + len_b <= budget``. Closed form."""
    if len_a + len_b <= budget:
        return len_a, len_b
    short = min(len_a, len_b)
    if 2 * short <= budget:  # only the longer text is cut
        return (len_a, budget - len_a) if len_a < len_b else (budget - len_b, len_b)
    return (budget + 1) // 2, budget // 2


def _label_ids(examples: Sequence[ClassificationExample], labels: Sequence[str]) -> Tensor:
    """(N,) int64 indices of each example's label in ``labels``."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for i, ex in enumerate(examples):
        if ex.label not in index:
            where = f"line {ex.line}" if ex.line is not None else f"example {i}"
            raise TaskDataError(f"{where}: label {ex.label!r} is not one of: {', '.join(labels)}")
        out.append(index[ex.label])
    return torch.tensor(out, dtype=torch.long)


def encode_classification(
    examples: Sequence[ClassificationExample],
    tokenizer: Any,
    labels: Sequence[str] | None,
    max_len: int,
    where: str | None = None,
) -> dict[str, Tensor]:
    """Encode examples as ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``.

    Returns ``input_ids`` (N, L) padded with [PAD], ``token_type_ids`` (N, L)
    (1 on ``b [SEP]``) and, unless ``labels`` is None, ``labels`` (N,) indexing
    into ``labels``. Sequences longer than ``max_len`` are truncated
    longest-first; one warning says how many were (in `where`, a file, when given).
    """
    ids = special_ids(tokenizer)
    cls, sep, pad = ids.cls, ids.sep, ids.pad
    has_pair = any(ex.text_b is not None for ex in examples)
    if max_len < (4 if has_pair else 3):
        raise TaskDataError(f"max_len={max_len} is too small to hold the special tokens plus text")
    enc_a = tokenizer.encode_batch([ex.text_a for ex in examples], add_special_tokens=False)
    enc_b = tokenizer.encode_batch([ex.text_b or "" for ex in examples], add_special_tokens=False)
    ids, types, truncated, emptied = [], [], 0, 0
    for ex, ea, eb in zip(examples, enc_a, enc_b):
        a, b = ea.ids, (eb.ids if ex.text_b is not None else None)
        if b is None:
            keep_a = min(len(a), max_len - 2)
            truncated += keep_a < len(a)
            ids.append([cls, *a[:keep_a], sep])
            types.append([0] * (keep_a + 2))
        else:
            keep_a, keep_b = _pair_lengths(len(a), len(b), max_len - 3)
            truncated += (keep_a, keep_b) != (len(a), len(b))
            emptied += (keep_a == 0 < len(a)) or (keep_b == 0 < len(b))
            ids.append([cls, *a[:keep_a], sep, *b[:keep_b], sep])
            types.append([0] * (keep_a + 2) + [1] * (keep_b + 1))
    if truncated:
        warnings.warn(
            (f"{where}: " if where else "")
            + f"{truncated} of {len(examples)} examples were longer than max_len={max_len} tokens "
            "and were truncated (longest first)"
            + (f"; in {emptied} of them one text of the pair lost every token" if emptied else ""),
            stacklevel=2,
        )
    out = {"input_ids": pad_rows(ids, pad), "token_type_ids": pad_rows(types, 0)}
    if labels is not None:
        out["labels"] = _label_ids(examples, labels)
    return out
