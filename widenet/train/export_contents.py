"""What may go into a model folder beside the weights (exported.write_export, widenet.save_pretrained):
class names, image statistics and a tokenizer that fit the model, checked before anything is written,
so that no folder is saved that loading would refuse or, worse, read wrongly; and a saved resize
setting checked when it is read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..data.images.folder import RESAMPLING
from ..models.vision import VisionTransformer
from ..settings import finite_numbers
from .checkpoint import CheckpointError

__all__ = ["check_contents", "resize_setting", "stats_problem"]


def stats_problem(key: str, values: Any, channels: int | None, saved: bool = False) -> str | None:
    """Why `values` cannot be the image `key` ("mean" or "std") of a model with `channels` channels:
    one finite number per channel, each std > 0; None when they can. saved: they were read from a file."""
    fits = finite_numbers(values) and (channels is None or len(values) == channels)
    if not fits or (key == "std" and min(values) <= 0):
        return (f"the {'saved ' if saved else ''}image {key} {values!r} should be one finite number per channel "
                f"({channels or 'as many as the model has'})" + (", each > 0" if key == "std" else ""))
    return None


def check_contents(model: nn.Module, classes: list[str] | None, image_stats: dict | None, tokenizer: Any) -> None:
    """ValueError naming the first of `classes`, `image_stats` ({"mean", "std"}) and `tokenizer` that
    does not fit `model`: a name per output of its classifier, statistics of an image model only,
    a tokenizer of a text model whose ids the model holds."""
    vision = isinstance(model, VisionTransformer)
    outputs = model.cfg.num_classes if vision else model.cfg.num_labels if model.cfg.task == "classify" else None
    if classes is not None:
        if len(classes) != outputs:  # names of other outputs would be shown as this model's
            raise ValueError(f"{len(classes)} class names for a model with "
                             + (f"{outputs} classes" if outputs else f"no classifier (task {model.cfg.task!r})"))
        if not isinstance(classes, (list, tuple)) or not all(isinstance(name, str) for name in classes):
            raise ValueError(f"class names must be text, got {classes!r}")
    if image_stats is not None:
        if not vision:
            raise ValueError("image mean and std are for image models; this is a text model")
        if set(image_stats) != {"mean", "std"}:
            raise ValueError(f"give the image mean and std together, got {', '.join(sorted(image_stats)) or 'none'}")
        for key in ("mean", "std"):
            if (problem := stats_problem(key, image_stats[key], model.cfg.in_channels)) is not None:
                raise ValueError(problem)
    if tokenizer is not None:
        if vision:
            raise ValueError("a tokenizer is for text models; this is an image model")
        if tokenizer.get_vocab_size() > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} pieces and the model's vocabulary "
                             f"{model.cfg.vocab_size} ids: it is not this model's tokenizer")


def resize_setting(value: Any, where: Path) -> dict[str, Any] | None:
    """A saved resize setting checked (CheckpointError when it is not one widenet reads)."""
    if value is None:
        return None
    if not (isinstance(value, dict) and set(value) == {"crop", "resample"} and isinstance(value["crop"], bool)
            and value["resample"] in RESAMPLING):
        raise CheckpointError(f"{where}: the saved image resize {value!r} should be {{crop: true|false, resample: "
                              f"{'|'.join(RESAMPLING)}}}")
    return dict(value)
