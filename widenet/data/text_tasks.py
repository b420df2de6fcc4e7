"""Text task data: GLUE-style sentence(-pair) classification and SQuAD span QA.

Readers turn task files into small dataclasses; encoders turn those into
padded ``int64`` tensors for an ALBERT/BERT-style encoder; and
:func:`postprocess_squad` maps span logits back to answer strings.

Tokenization uses a ``tokenizers.Tokenizer`` whose vocabulary holds the
special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]``. Text is always encoded
with ``add_special_tokens=False`` and ``[CLS]``/``[SEP]`` are placed here, so
truncation and QA windows stay under our control.

Shape legend
------------
N  number of classification examples
F  number of QA features (one per context window; an example may have several)
L  padded sequence length (the longest encoded sequence, at most ``max_len``)

Every malformed input raises :class:`TaskDataError` whose message starts with
the file (and line, where there is one) at fault.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LABEL_COLUMNS",
    "TEXT_PAIR_COLUMNS",
    "TEXT_SINGLE_COLUMNS",
    "ClassificationExample",
    "QAFeatures",
    "SquadExample",
    "TaskDataError",
    "check_labels",
    "encode_classification",
    "encode_squad",
    "label_vocabulary",
    "postprocess_squad",
    "read_classification",
    "read_squad",
]

PathLike = str | os.PathLike

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

# How many characters an answer_start may be off in official SQuAD data.
ANSWER_START_TOLERANCE = 2


class TaskDataError(ValueError):
    """A task file (or the data handed to an encoder) is missing or malformed."""


def _at(path: PathLike, line: int | None = None) -> str:
    """The location prefix of an error message: ``"file"`` or ``"file line 7"``."""
    return f"{path}" if line is None else f"{path} line {line}"


# --------------------------------------------------------------------------
# Classification: reading
# --------------------------------------------------------------------------


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
    label = next((c for c in LABEL_COLUMNS if c in names), None)
    for a, b in TEXT_PAIR_COLUMNS:
        if a in names and b in names:
            return _Schema(a, b, label)
    for a in TEXT_SINGLE_COLUMNS:
        if a in names:
            return _Schema(a, None, label)
    raise TaskDataError(
        f"{_at(path, line)}: no recognised text column; found columns "
        f"{', '.join(map(repr, columns)) or '(none)'}; accepted names: {_accepted_names()}"
    )


def _label_string(value: Any, path: PathLike, line: int) -> str:
    """A label as a string: JSON ints become "0"/"1", bools "1"/"0"."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise TaskDataError(f"{_at(path, line)}: label must be a string or number, got {value!r}")


def _example(record: dict[str, Any], schema: _Schema, path: PathLike, line: int) -> ClassificationExample:
    """Build one example from a row/record, rejecting missing or empty values."""
    wanted = [schema.text_a, schema.text_b, schema.label]
    for key in filter(None, wanted):
        value = record.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise TaskDataError(f"{_at(path, line)}: missing value for column {key!r}")
    for key in filter(None, wanted[:2]):
        if not isinstance(record[key], str):
            raise TaskDataError(f"{_at(path, line)}: column {key!r} must be text, got {record[key]!r}")
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
                        f"{_at(path, line)}: expected {len(header)} fields (as in the header), got {len(row)}"
                    )
                examples.append(_example(dict(zip(header, row)), schema, path, line))
        except csv.Error as err:
            raise TaskDataError(f"{_at(path, reader.line_num)}: unreadable row: {err}") from None
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
                raise TaskDataError(f"{_at(path, line)}: bad JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"{_at(path, line)}: expected a JSON object, got {type(record).__name__}")
            if schema is None:
                schema = _schema(list(record), path, line)
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
        where = _at(path, ex.line) if ex.line is not None else f"{path} example {i}"
        if ex.label is None:
            raise TaskDataError(f"{where}: example has no label")
        if ex.label not in known:
            raise TaskDataError(
                f"{where}: label {ex.label!r} is not one of the training labels: {', '.join(labels)}"
            )


# --------------------------------------------------------------------------
# Classification: encoding
# --------------------------------------------------------------------------


def _special_ids(tokenizer: Any) -> tuple[int, int, int]:
    """The ids of [CLS], [SEP] and [PAD] in ``tokenizer``'s vocabulary."""
    ids = []
    for token in ("[CLS]", "[SEP]", "[PAD]"):
        idx = tokenizer.token_to_id(token)
        if idx is None:
            raise TaskDataError(f"tokenizer has no {token} token; expected [PAD] [UNK] [CLS] [SEP] [MASK]")
        ids.append(idx)
    return ids[0], ids[1], ids[2]


def _pair_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Longest-first truncation: repeatedly drop a token from the longer text
    (from text_b on a tie) until ``len_a + len_b <= budget``. Closed form."""
    if len_a + len_b <= budget:
        return len_a, len_b
    short = min(len_a, len_b)
    if 2 * short <= budget:  # only the longer text is cut
        return (len_a, budget - len_a) if len_a < len_b else (budget - len_b, len_b)
    return (budget + 1) // 2, budget // 2


def _pad(rows: list[list[int]], pad: int) -> Tensor:
    """(len(rows), longest) int64, right-padded with ``pad``."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


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
) -> dict[str, Tensor]:
    """Encode examples as ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``.

    Returns ``input_ids`` (N, L) padded with [PAD], ``token_type_ids`` (N, L)
    (1 on ``b [SEP]``) and, unless ``labels`` is None, ``labels`` (N,) indexing
    into ``labels``. Sequences longer than ``max_len`` are truncated
    longest-first; one warning says how many were.
    """
    cls, sep, pad = _special_ids(tokenizer)
    has_pair = any(ex.text_b is not None for ex in examples)
    if max_len < (4 if has_pair else 3):
        raise TaskDataError(f"max_len={max_len} is too small to hold the special tokens plus text")
    enc_a = tokenizer.encode_batch([ex.text_a for ex in examples], add_special_tokens=False)
    enc_b = tokenizer.encode_batch([ex.text_b or "" for ex in examples], add_special_tokens=False)
    ids, types, truncated = [], [], 0
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
            ids.append([cls, *a[:keep_a], sep, *b[:keep_b], sep])
            types.append([0] * (keep_a + 2) + [1] * (keep_b + 1))
    if truncated:
        warnings.warn(
            f"{truncated} of {len(examples)} examples were longer than max_len={max_len} tokens "
            "and were truncated (longest first)",
            stacklevel=2,
        )
    out = {"input_ids": _pad(ids, pad), "token_type_ids": _pad(types, 0)}
    if labels is not None:
        out["labels"] = _label_ids(examples, labels)
    return out


# --------------------------------------------------------------------------
# SQuAD: reading
# --------------------------------------------------------------------------


@dataclass
class SquadExample:
    """One question on one context; ``answers`` are (text, char start) pairs.

    Unanswerable (v2.0) questions have ``is_impossible=True`` and no answers.
    """

    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]
    is_impossible: bool


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]``, checked to exist and to be of type ``kind``."""
    if not isinstance(obj, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise TaskDataError(f"{where}: missing key {key!r}")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise TaskDataError(f"{where}: {key!r} must be {names}, got {type(value).__name__}")
    return value


def _align_answer(text: str, start: int, context: str, where: str) -> int:
    """The answer's true char start: ``start`` if it matches, else the nearest match within
    +-ANSWER_START_TOLERANCE characters (official data has a few off-by-one starts)."""
    if not text:
        raise TaskDataError(f"{where}: empty answer text")
    for delta in sorted(range(-ANSWER_START_TOLERANCE, ANSWER_START_TOLERANCE + 1), key=abs):
        s = start + delta
        if 0 <= s and context[s : s + len(text)] == text:
            return s
    found = context[max(start, 0) : max(start, 0) + len(text)]
    raise TaskDataError(
        f"{where}: answer {text!r} does not match the context at answer_start={start} (found {found!r})"
    )


def _read_qa(qa: Any, context: str, where: str) -> SquadExample:
    """One SQuAD question record -> SquadExample."""
    qid = str(_require(qa, "id", (str, int), where))
    where = f"{where} (question id {qid!r})"
    question = _require(qa, "question", str, where)
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise TaskDataError(f"{where}: 'is_impossible' must be true or false, got {impossible!r}")
    answers: list[tuple[str, int]] = []
    if not impossible:
        raw = _require(qa, "answers", list, where)
        if not raw:
            raise TaskDataError(f"{where}: answerable question has no answers")
        for k, ans in enumerate(raw):
            at = f"{where} answers[{k}]"
            text = _require(ans, "text", str, at)
            start = _require(ans, "answer_start", int, at)
            answers.append((text, _align_answer(text, start, context, at)))
    return SquadExample(qid, question, context, answers, impossible)


def _squad_version(data: dict[str, Any], examples_have_flag: bool) -> str:
    """"1.1" or "2.0": the file's "version" field, else inferred from is_impossible keys."""
    declared = str(data.get("version", "")).strip().lower().lstrip("v")
    if declared in ("1.1", "2.0"):
        return declared
    return "2.0" if examples_have_flag else "1.1"


def read_squad(path: PathLike) -> tuple[list[SquadExample], str]:
    """Read a SQuAD v1.1/v2.0 JSON file; returns (examples, version "1.1" or "2.0").

    Answer starts that are off by up to two characters are corrected; any
    other mismatch between an answer and its context is an error naming the
    question id.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    try:
        with path.open(encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise TaskDataError(f"{_at(path, err.lineno)}: bad JSON: {err.msg} (column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise TaskDataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    articles = _require(data, "data", list, f"{path}: top level")
    examples: list[SquadExample] = []
    has_flag = False
    for i, article in enumerate(articles):
        title = article.get("title", "") if isinstance(article, dict) else ""
        a_where = f"{path}: data[{i}]" + (f" ({title!r})" if title else "")
        for j, para in enumerate(_require(article, "paragraphs", list, a_where)):
            p_where = f"{a_where} paragraphs[{j}]"
            context = _require(para, "context", str, p_where)
            for k, qa in enumerate(_require(para, "qas", list, p_where)):
                has_flag = has_flag or (isinstance(qa, dict) and "is_impossible" in qa)
                examples.append(_read_qa(qa, context, f"{p_where} qas[{k}]"))
    return examples, _squad_version(data, has_flag)


# --------------------------------------------------------------------------
# SQuAD: windows and features
# --------------------------------------------------------------------------


@dataclass
class QAFeatures:
    """Encoded context windows, one row per feature.

    input_ids       (F, L) int64  [CLS] question [SEP] window [SEP] [PAD]...
    token_type_ids  (F, L) int64  1 on "window [SEP]"
    start_positions (F,)   int64  token index of the first gold answer's start, 0 ([CLS]) if
                                  the answer is not fully inside the window or is impossible
    end_positions   (F,)   int64  likewise, its last token
    example_index   (F,)   int64  which example the window belongs to
    offsets         F lists of L entries: (char_start, char_end) into the context
                    for context tokens, None for question/special/pad tokens
    """

    input_ids: Tensor
    token_type_ids: Tensor
    start_positions: Tensor
    end_positions: Tensor
    example_index: Tensor
    offsets: list[list[tuple[int, int] | None]]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _windows(n_tokens: int, width: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) of sliding windows of ``width`` tokens that advance by
    ``min(stride, width)`` until the last one reaches the end (one window if n=0)."""
    spans, start = [], 0
    while True:
        length = min(width, n_tokens - start)
        spans.append((start, length))
        if start + length >= n_tokens:
            return spans
        start += min(stride, length)


def _answer_tokens(offsets: Sequence[tuple[int, int]], start: int, text: str) -> tuple[int, int] | None:
    """(first, last) context-token index covering chars [start, start+len(text)), or None."""
    end = start + len(text)
    covering = [t for t, (s, e) in enumerate(offsets) if s < end and e > start]
    return (covering[0], covering[-1]) if covering else None


def _check_squad_args(max_len: int, doc_stride: int, max_query_len: int) -> None:
    for name, value in (("max_len", max_len), ("doc_stride", doc_stride), ("max_query_len", max_query_len)):
        if not isinstance(value, int) or value < 1:
            raise TaskDataError(f"{name} must be a positive integer, got {value!r}")


def encode_squad(
    examples: Sequence[SquadExample],
    tokenizer: Any,
    max_len: int = 384,
    doc_stride: int = 128,
    max_query_len: int = 64,
) -> QAFeatures:
    """Encode SQuAD examples into sliding-window features (see :class:`QAFeatures`).

    The question is cut to ``max_query_len`` tokens; each context is split
    into windows of ``max_len - len(question) - 3`` tokens that start
    ``doc_stride`` tokens apart. The first gold answer is located in each
    window; windows that do not hold all of it (and impossible questions)
    point at [CLS] (start = end = 0).
    """
    _check_squad_args(max_len, doc_stride, max_query_len)
    cls, sep, pad = _special_ids(tokenizer)
    questions = tokenizer.encode_batch([ex.question for ex in examples], add_special_tokens=False)
    contexts = tokenizer.encode_batch([ex.context for ex in examples], add_special_tokens=False)
    ids, types, starts, ends, owner, offsets = [], [], [], [], [], []
    for index, (ex, q_enc, c_enc) in enumerate(zip(examples, questions, contexts)):
        q = q_enc.ids[:max_query_len]
        width = max_len - len(q) - 3
        if width < 1:
            raise TaskDataError(
                f"max_len={max_len} cannot hold question {ex.id!r} ({len(q)} tokens) plus [CLS], two [SEP] "
                f"and at least one context token; raise max_len or lower max_query_len={max_query_len}"
            )
        gold = None
        if not ex.is_impossible and ex.answers:
            gold = _answer_tokens(c_enc.offsets, ex.answers[0][1], ex.answers[0][0])
        first = len(q) + 2  # position of the window's first token
        for w_start, w_len in _windows(len(c_enc.ids), width, doc_stride):
            ids.append([cls, *q, sep, *c_enc.ids[w_start : w_start + w_len], sep])
            types.append([0] * first + [1] * (w_len + 1))
            offsets.append([None] * first + list(c_enc.offsets[w_start : w_start + w_len]) + [None])
            inside = gold is not None and gold[0] >= w_start and gold[1] < w_start + w_len
            starts.append(first + gold[0] - w_start if inside else 0)
            ends.append(first + gold[1] - w_start if inside else 0)
            owner.append(index)
    input_ids = _pad(ids, pad)
    for row in offsets:
        row.extend([None] * (input_ids.shape[1] - len(row)))
    return QAFeatures(
        input_ids=input_ids,
        token_type_ids=_pad(types, 0),
        start_positions=torch.tensor(starts, dtype=torch.long),
        end_positions=torch.tensor(ends, dtype=torch.long),
        example_index=torch.tensor(owner, dtype=torch.long),
        offsets=offsets,
    )


# --------------------------------------------------------------------------
# SQuAD: logits -> answer strings
# --------------------------------------------------------------------------


def _as_logits(logits: Any, name: str, shape: tuple[int, ...]) -> Tensor:
    """``logits`` as a float CPU tensor of exactly ``shape``."""
    t = torch.as_tensor(logits).detach().float().cpu()
    if tuple(t.shape) != shape:
        raise TaskDataError(f"{name} must have shape {shape} (features x tokens), got {tuple(t.shape)}")
    return t


def _best_span(
    start: Tensor, end: Tensor, context: Tensor, n_best: int, max_answer_len: int
) -> tuple[float, int, int] | None:
    """(score, start, end) of the best valid span in one feature, or None.

    start, end (L,) logits; context (L,) bool. Candidates are the ``n_best``
    highest start and end logits among context tokens; a span is valid when
    start <= end and it is at most ``max_answer_len`` tokens long.
    """
    k = min(n_best, int(context.sum()))
    if k == 0:
        return None
    neg = torch.tensor(float("-inf"))
    s_val, s_idx = torch.where(context, start, neg).topk(k)  # (k,)
    e_val, e_idx = torch.where(context, end, neg).topk(k)  # (k,)
    length = e_idx[None, :] - s_idx[:, None]  # (k, k)
    valid = (length >= 0) & (length < max_answer_len)
    if not valid.any():
        return None
    scores = torch.where(valid, s_val[:, None] + e_val[None, :], neg)  # (k, k)
    flat = int(scores.argmax())
    i, j = divmod(flat, k)
    return float(scores[i, j]), int(s_idx[i]), int(e_idx[j])


def postprocess_squad(
    examples: Sequence[SquadExample],
    features: QAFeatures,
    start_logits: Any,
    end_logits: Any,
    n_best: int = 20,
    max_answer_len: int = 30,
    *,
    version_2: bool,
    null_threshold: float = 0.0,
) -> dict[str, str]:
    """Answer text per example id from span logits (F, L).

    The best span over all of an example's windows (by start + end logit)
    is cut from the context via the offsets. With ``version_2`` the answer is
    "" when ``min_windows(start[0] + end[0]) - best_span_score > null_threshold``
    (or when no window holds a valid span).
    """
    if n_best < 1 or max_answer_len < 1:
        raise TaskDataError(f"n_best and max_answer_len must be >= 1, got {n_best}, {max_answer_len}")
    shape = tuple(features.input_ids.shape)
    start_logits = _as_logits(start_logits, "start_logits", shape)
    end_logits = _as_logits(end_logits, "end_logits", shape)
    if len(features) and int(features.example_index.max()) >= len(examples):
        raise TaskDataError("features refer to more examples than were given; pass the examples they came from")
    best: dict[int, tuple[float, int, int, int]] = {}  # example -> (score, feature, start, end)
    null: dict[int, float] = {}
    for f in range(len(features)):
        ex = int(features.example_index[f])
        null[ex] = min(null.get(ex, float("inf")), float(start_logits[f, 0] + end_logits[f, 0]))
        context = torch.tensor([o is not None for o in features.offsets[f]])
        span = _best_span(start_logits[f], end_logits[f], context, n_best, max_answer_len)
        if span is not None and (ex not in best or span[0] > best[ex][0]):
            best[ex] = (span[0], f, span[1], span[2])
    answers: dict[str, str] = {}
    for i, example in enumerate(examples):
        if i not in best or (version_2 and null[i] - best[i][0] > null_threshold):
            answers[example.id] = ""
            continue
        _, f, s, e = best[i]
        answers[example.id] = example.context[features.offsets[f][s][0] : features.offsets[f][e][1]]
    return answers
