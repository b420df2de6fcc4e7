"""How a fine-tuned text model's inputs were prepared: the settings prediction must reuse.

Fine-tuning records them in a checkpoint's meta (data.inputs) and `widenet
export` carries them into config.json ("inputs"):
    classify: {"pairs": whether the texts were sentence pairs, "max_len": tokens per sequence}
    qa:       {"max_len": tokens per window, "doc_stride", "max_query_len": tokens of a question,
               "no_answer": whether its evaluation allowed SQuAD 2.0's "no answer" (2.0 validation data),
               "null_threshold": the margin by which "no answer" had to beat the best span there,
               "trained_no_answer": whether its training data held unanswerable questions}
Runs fine-tuned before the record have them read back from their train_config
(all but "pairs"; "no_answer" from the SQuAD version recorded with the data).
Hugging Face folders and pretraining runs have none.
"""

from __future__ import annotations

from typing import Any

from ..settings import finite_numbers
from .checkpoint import CheckpointError
from .text_config import FinetuneConfig

__all__ = ["DEFAULT_MAX_LEN", "QA_DOC_STRIDE", "QA_MAX_QUERY_LEN", "default_max_len", "recorded_inputs"]

DEFAULT_MAX_LEN = {"classify": 128, "qa": 384}  # tokens per sequence, unless the model has fewer positions
QA_DOC_STRIDE, QA_MAX_QUERY_LEN = FinetuneConfig.doc_stride, FinetuneConfig.max_query_len  # fine-tuning's defaults
_LENGTHS = ("max_len", "doc_stride", "max_query_len")
_FLAGS = ("pairs", "no_answer", "trained_no_answer")


def default_max_len(task: str, max_positions: int) -> int:
    """Fine-tuning's tokens per sequence when none is given: the task's default, or fewer where the
    model has fewer positions."""
    return min(DEFAULT_MAX_LEN[task], max_positions)


def recorded_inputs(meta: dict, where: Any) -> dict[str, Any] | None:
    """The input settings saved with a model (see the module doc), checked; None when there are none.
    where: the file or folder to name when they are not what fine-tuning writes (CheckpointError)."""
    inputs = (meta.get("data") or {}).get("inputs")
    saved = "saved inputs"
    if inputs is None:
        inputs, saved = _from_train_config(meta), "fine-tuning settings"
        if inputs is None:
            return None
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    if not (isinstance(inputs, dict) and set(inputs) <= {"null_threshold", *_FLAGS, *_LENGTHS}
            and all(whole(inputs[k]) for k in _LENGTHS if k in inputs)
            and all(isinstance(inputs.get(k, False), bool) for k in _FLAGS)
            and finite_numbers([inputs.get("null_threshold", 0.0)])):
        raise CheckpointError(f"{where}: the {saved} {inputs!r} should hold max_len, doc_stride and "
                              "max_query_len as positive whole numbers, pairs and no_answer(s) as true or false "
                              "and null_threshold as a number")
    inputs = dict(inputs)
    version = (meta.get("data") or {}).get("squad_version")
    if "no_answer" not in inputs and version in ("1.1", "2.0"):  # fine-tuned before no_answer was recorded
        inputs["no_answer"] = version == "2.0"
        threshold = (meta.get("train_config") or {}).get("null_threshold", 0.0)
        inputs["null_threshold"] = float(threshold) if finite_numbers([threshold]) else 0.0
    return inputs


def _from_train_config(meta: dict) -> dict[str, Any] | None:
    """The inputs a run fine-tuned before they were recorded used, from its settings (all but pairs)."""
    config = meta.get("train_config") or {}
    task = config.get("task")
    if task not in DEFAULT_MAX_LEN or "doc_stride" not in config:  # not a fine-tuning run
        return None
    limit = (meta.get("model_config") or {}).get("max_positions")
    inputs = {"max_len": config.get("max_len") or default_max_len(task, limit)} if isinstance(limit, int) else {}
    if task == "qa":
        inputs.update({k: config[k] for k in ("doc_stride", "max_query_len") if k in config})
    return inputs or None
