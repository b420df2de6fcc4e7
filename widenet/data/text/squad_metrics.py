"""SQuAD v1.1 / v2.0 evaluation: exact match and token F1.

Written from the documented behaviour of the official evaluation scripts:

* answers are compared after :func:`normalize_answer` (lower case, drop
  punctuation, drop the articles a/an/the, collapse whitespace);
* EM is 1 when the normalized strings are equal;
* F1 is the harmonic mean of token precision and recall, with tokens counted
  as a bag of words; when either side has no tokens (v2.0 "no answer"), F1 is
  1 if both are empty and 0 otherwise;
* each question scores the maximum over its gold answers; an unanswerable
  question's only gold answer is "", so the right prediction is "".
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: keeps this module free of torch
    from .squad import SquadExample

__all__ = ["exact_match", "f1_score", "normalize_answer", "squad_scores"]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower case, strip punctuation, remove whole-word articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split()


def exact_match(prediction: str, gold: str) -> int:
    """1 if the normalized answers are identical, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Bag-of-words token F1 between normalized answers (v2.0 rule for empty answers)."""
    pred, ref = _tokens(prediction), _tokens(gold)
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _golds(example: SquadExample) -> list[str]:
    """Gold answers to score against: [""] for unanswerable questions (or only-empty answers)."""
    if example.is_impossible:
        return [""]
    golds = [text for text, _ in example.answers if normalize_answer(text)]
    return golds or [""]


def _percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def squad_scores(
    predictions: Mapping[str, str],
    examples: Sequence[SquadExample],
    version_2: bool | None = None,
) -> dict[str, float | int]:
    """EM and F1 (percentages, 0-100) of ``predictions`` (question id -> text).

    Returns ``exact``, ``f1``, ``total`` and ``missing`` (questions without a
    prediction; scored as ""). For v2.0 data (``version_2``; by default: any
    question is unanswerable) also ``HasAns_total``/``NoAns_total`` and, for a
    non-empty group, ``HasAns_exact``/``HasAns_f1`` and ``NoAns_exact``/``NoAns_f1``.
    """
    if not examples:
        raise ValueError("squad_scores needs at least one example")
    if version_2 is None:
        version_2 = any(ex.is_impossible for ex in examples)
    em: dict[bool, list[float]] = {True: [], False: []}  # keyed by "has answer"
    f1: dict[bool, list[float]] = {True: [], False: []}
    missing = 0
    for ex in examples:
        missing += ex.id not in predictions
        pred = predictions.get(ex.id, "")
        golds = _golds(ex)
        has_answer = not ex.is_impossible
        em[has_answer].append(max(exact_match(pred, g) for g in golds))
        f1[has_answer].append(max(f1_score(pred, g) for g in golds))
    all_em, all_f1 = em[True] + em[False], f1[True] + f1[False]
    out: dict[str, float | int] = {
        "exact": _percent(all_em),
        "f1": _percent(all_f1),
        "total": len(all_em),
        "missing": missing,
    }
    if version_2:
        for name, key in (("HasAns", True), ("NoAns", False)):
            if em[key]:
                out[f"{name}_exact"] = _percent(em[key])
                out[f"{name}_f1"] = _percent(f1[key])
            out[f"{name}_total"] = len(em[key])
    return out
