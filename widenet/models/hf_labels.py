"""The classes of a Hugging Face classifier: their names (config.json's id2label) and whether its
head is one widenet's classifiers compute (one label of several, by a softmax)."""

from __future__ import annotations

from ..settings import repeated

__all__ = ["classifier_problem", "label_names"]


def label_names(config: dict) -> tuple[list[str] | None, list[str]]:
    """The class names of id2label, by id (None without one), and notes. With ids other than 0..n-1
    the classes stay unnamed (numbered) rather than some named wrongly; a name given to several
    outputs gets each one's index. A note says which."""
    labels = config.get("id2label")
    if not isinstance(labels, dict) or not labels:
        return None, []
    by_id = {str(k): str(v) for k, v in labels.items()}
    if set(by_id) != {str(i) for i in range(len(by_id))}:
        return None, [f"config.json's id2label names ids {', '.join(sorted(by_id))}, not 0..{len(by_id) - 1}: "
                      "the classes are left unnamed (numbered)"]
    names = [by_id[str(i)] for i in range(len(by_id))]
    if not (twice := repeated(names)):  # ImageNet's has two "crane"s
        return names, []
    return [f"{name} ({i})" if name in twice else name for i, name in enumerate(names)], [
        f"config.json's id2label gives {', '.join(map(repr, twice))} to more than one output: those classes are "
        "named with their index too (e.g. 'crane (134)')"]


def classifier_problem(config: dict, classes: list[str] | None, rows: int) -> str | None:
    """Why a classifier of `rows` outputs cannot be imported, or None.

    widenet's classifiers pick one label of several (softmax, cross-entropy). transformers also
    saves regression heads (problem_type "regression", or one output without a problem_type) and
    multi-label heads (a sigmoid per label): read as single-label classifiers they would print a
    label for a number, or probabilities that sum to one for labels that are true independently.
    The names of id2label must also be the classifier's rows (transformers refuses such a folder too).
    """
    kind = config.get("problem_type")
    if kind == "multi_label_classification":
        return ("a multi-label classifier (problem_type multi_label_classification: each label true or not on its own); "
                "widenet's classifiers pick one label of several, so it is not imported")
    if kind == "regression" or (not kind and rows == 1):
        why = "problem_type regression" if kind else "one output and no problem_type, which transformers reads as one"
        return f"a regression head ({why}); widenet's classifiers pick one label of several, so it is not imported"
    if classes is not None and len(classes) != rows:
        return (f"config.json names {len(classes)} labels (id2label) but the classifier has {rows} rows; "
                "fix id2label/num_labels to match the weights")
    return None
