"""SQuAD EM/F1 on hand-computed cases (the arithmetic is written out in comments)."""

from __future__ import annotations

import pytest

from widenet.data.text.squad_metrics import (
    exact_match,
    f1_score,
    normalize_answer,
    squad_scores,
)
from widenet.data.text.squad import SquadExample


def example(qid: str, answers: list[str], impossible: bool = False) -> SquadExample:
    """A SquadExample whose context is irrelevant to scoring."""
    return SquadExample(qid, "q?", "context", [(a, 0) for a in answers], impossible)


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("The  Eiffel\tTower", "eiffel tower"),  # lower, article, whitespace
        ("U.S.A.!", "usa"),  # punctuation removed without a space
        ("an apple, a pear", "apple pear"),  # articles a/an as whole words
        ("theatre Anna", "theatre anna"),  # not inside words
        ("Plan A", "plan"),  # "a" becomes an article once lower-cased
        ("", ""),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match_ignores_case_articles_and_punctuation():
    # "the Eiffel Tower" -> "eiffel tower"; "Eiffel tower" -> "eiffel tower"
    assert exact_match("the Eiffel Tower", "Eiffel tower") == 1
    assert f1_score("the Eiffel Tower", "Eiffel tower") == 1.0
    assert exact_match("Paris!", "paris") == 1
    assert exact_match("Paris", "Paris France") == 0


def test_f1_partial_overlap():
    # pred tokens [in, paris, france], gold [paris]: 1 common.
    # precision 1/3, recall 1/1, F1 = 2 * (1/3) * 1 / (1/3 + 1) = (2/3) / (4/3) = 0.5
    assert f1_score("in Paris France", "Paris") == pytest.approx(0.5)
    # Bag of words: pred [paris, paris], gold [paris]: common min(2, 1) = 1.
    # precision 1/2, recall 1, F1 = 2 * 0.5 / 1.5 = 2/3
    assert f1_score("Paris Paris", "Paris") == pytest.approx(2 / 3)
    # pred [red, car], gold [blue, car]: 1 common, P = R = 1/2, F1 = 1/2
    assert f1_score("red car", "blue car") == pytest.approx(0.5)
    # no common token
    assert f1_score("London", "Paris") == 0.0


def test_empty_answers_v2_rule():
    # both empty (correct "no answer"): EM 1, F1 1
    assert exact_match("", "") == 1 and f1_score("", "") == 1.0
    # an answer where there is none, or none where there is one: 0
    assert exact_match("x", "") == 0 and f1_score("x", "") == 0.0
    assert f1_score("", "Paris") == 0.0
    # "the" normalizes to no tokens, so it counts as empty
    assert f1_score("the", "") == 1.0


def test_max_over_gold_answers():
    # golds "Paris" and "the city of Paris" (-> "city of paris")
    # pred "city of Paris": EM with the second gold -> EM 1, F1 1
    ex = example("q1", ["Paris", "the city of Paris"])
    scores = squad_scores({"q1": "city of Paris"}, [ex])
    assert scores["exact"] == 100.0 and scores["f1"] == 100.0
    # pred "Paris France": vs "Paris" P 1/2 R 1 F1 2/3; vs "France, Europe" P 1/2 R 1/2 F1 1/2
    # -> EM 0, F1 max(2/3, 1/2) = 2/3 -> 66.67
    ex = example("q2", ["Paris", "France, Europe"])
    scores = squad_scores({"q2": "Paris France"}, [ex])
    assert scores["exact"] == 0.0
    assert scores["f1"] == pytest.approx(100 * 2 / 3)
    assert scores["total"] == 1 and scores["missing"] == 0
    assert "HasAns_exact" not in scores  # v1.1 data: no breakdown


def three_question_v2_set() -> list[SquadExample]:
    return [
        example("a", ["Eiffel Tower"]),
        example("b", ["Paris"]),
        example("c", [], impossible=True),
    ]


def test_mixed_v2_set_with_breakdown():
    # a: "the Eiffel Tower" vs "Eiffel Tower"     -> EM 1, F1 1
    # b: "in Paris France"  vs "Paris"            -> EM 0, F1 0.5
    # c: "x" vs unanswerable (gold "")            -> EM 0, F1 0
    # all:    EM (1+0+0)/3 = 33.33%, F1 (1+0.5+0)/3 = 50%
    # HasAns: EM (1+0)/2 = 50%, F1 (1+0.5)/2 = 75%, total 2
    # NoAns:  EM 0%, F1 0%, total 1
    preds = {"a": "the Eiffel Tower", "b": "in Paris France", "c": "x"}
    scores = squad_scores(preds, three_question_v2_set())
    assert scores["exact"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(50.0)
    assert scores["total"] == 3 and scores["missing"] == 0
    assert scores["HasAns_exact"] == pytest.approx(50.0)
    assert scores["HasAns_f1"] == pytest.approx(75.0)
    assert scores["HasAns_total"] == 2
    assert scores["NoAns_exact"] == 0.0 and scores["NoAns_f1"] == 0.0
    assert scores["NoAns_total"] == 1


def test_missing_prediction_counts_as_empty():
    # c has no prediction -> "" -> correct for the unanswerable question.
    # all: EM (1+0+1)/3 = 66.67%, F1 (1+0.5+1)/3 = 83.33%; NoAns EM 100%
    preds = {"a": "the Eiffel Tower", "b": "in Paris France"}
    scores = squad_scores(preds, three_question_v2_set())
    assert scores["missing"] == 1
    assert scores["exact"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(250 / 3)
    assert scores["NoAns_exact"] == 100.0 and scores["NoAns_f1"] == 100.0


def test_v2_breakdown_when_forced_and_group_empty():
    scores = squad_scores({"b": "Paris"}, [example("b", ["Paris"])], version_2=True)
    assert scores["HasAns_exact"] == 100.0 and scores["HasAns_total"] == 1
    assert scores["NoAns_total"] == 0 and "NoAns_exact" not in scores


def test_no_examples_is_an_error():
    with pytest.raises(ValueError, match="at least one example"):
        squad_scores({}, [])
