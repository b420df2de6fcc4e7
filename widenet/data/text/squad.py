"""SQuAD v1.1/v2.0 span QA: reading, windowed encoding, and span logits back to answer strings.

Contexts longer than the model's window are cut into overlapping windows
(``doc_stride`` apart), one feature each; :func:`postprocess_squad` takes the
best span over all of an example's windows.

Shape legend: F features (one per context window; an example may have
several), L the padded length (at most ``max_len``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import PathLike
from .task_common import TaskDataError, at, pad_rows
from .tokenizer import special_ids

__all__ = ["ANSWER_START_TOLERANCE", "QAFeatures", "SquadExample", "encode_squad", "postprocess_squad", "read_squad"]


# How many characters an answer_start may be off in official SQuAD data.
ANSWER_START_TOLERANCE = 2


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
    if start < 0:
        raise TaskDataError(f"{where}: answer_start={start} is negative (a character offset into the context)")
    found = context[start : start + len(text)]
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
        raise TaskDataError(f"{at(path, err.lineno)}: bad JSON: {err.msg} (column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise TaskDataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    articles = _require(data, "data", list, f"{path}: top level")
    examples: list[SquadExample] = []
    first_seen: dict[str, str] = {}  # question id -> where it first appeared
    has_flag = False
    for i, article in enumerate(articles):
        title = article.get("title", "") if isinstance(article, dict) else ""
        a_where = f"{path}: data[{i}]" + (f" ({title!r})" if title else "")
        for j, para in enumerate(_require(article, "paragraphs", list, a_where)):
            p_where = f"{a_where} paragraphs[{j}]"
            context = _require(para, "context", str, p_where)
            for k, qa in enumerate(_require(para, "qas", list, p_where)):
                has_flag = has_flag or (isinstance(qa, dict) and "is_impossible" in qa)
                q_where = f"{p_where} qas[{k}]"
                example = _read_qa(qa, context, q_where)
                if example.id in first_seen:  # answers and scores are looked up by id
                    raise TaskDataError(f"{q_where}: question id {example.id!r} appears twice "
                                        f"(first at {first_seen[example.id].removeprefix(f'{path}: ')})")
                first_seen[example.id] = q_where
                examples.append(example)
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
    questions_cut   how many examples' questions were longer than max_query_len tokens (cut)
    """

    input_ids: Tensor
    token_type_ids: Tensor
    start_positions: Tensor
    end_positions: Tensor
    example_index: Tensor
    offsets: list[list[tuple[int, int] | None]]
    questions_cut: int = 0

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
    ids = special_ids(tokenizer)
    cls, sep, pad = ids.cls, ids.sep, ids.pad
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
    input_ids = pad_rows(ids, pad)
    for row in offsets:
        row.extend([None] * (input_ids.shape[1] - len(row)))
    return QAFeatures(
        input_ids=input_ids,
        token_type_ids=pad_rows(types, 0),
        start_positions=torch.tensor(starts, dtype=torch.long),
        end_positions=torch.tensor(ends, dtype=torch.long),
        example_index=torch.tensor(owner, dtype=torch.long),
        offsets=offsets,
        questions_cut=sum(len(q_enc.ids) > max_query_len for q_enc in questions),
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
