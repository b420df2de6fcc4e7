"""`widenet eval`: rebuild a model from its checkpoint and evaluate it."""

from __future__ import annotations

import contextlib
import math
import os

from torch import nn

from ..data.errors import DatasetNotFoundError
from ..data.images import channels_problem, check_same_classes, load_dataset, subset
from ..layers.moe import dropless_routing
from ..listing import counted
from ..models.vision import VisionConfig
from ..runtime import resolve_device
from .checkpoint import CheckpointError
from .ema import averaged_weights
from .exported import Source, load_model, load_source, non_finite_problem
from .hf_folder import fallback_stats
from .evaluate import evaluate


def evaluate_checkpoint(path: str, data: str | None = None, data_dir: str | None = None,
                        batch_size: int = 512, device: str = "auto", test_subset: int | None = None,
                        ema: bool = False, tta: str = "none", dropless: bool = False) -> dict:
    """Accuracy, loss and per-block routing of a saved model on a test split.

    ema: evaluate the weight average that `widenet train --ema-decay` keeps in the train state.
    tta: "flip" averages each image's and its mirror image's predictions.
    dropless: every MoE layer routes every token (no capacity): the results do not depend on
        batch_size, which otherwise sets how many images share each layer's capacity.
    """
    ckpt = load_source(path)  # a run, a checkpoint, an exported folder or a Hugging Face ViT folder
    meta = ckpt.meta
    if "model" not in meta or not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{ckpt.path}: meta.json lacks the model name/config")
    if "tokenizer" in meta or "vocab_size" in meta["model_config"]:
        what, scores = (("a text run (pretraining or fine-tuning)", "; a text run's validation scores are in its "
                         "metrics.jsonl") if ckpt.step is not None else ("a text model", ""))
        raise CheckpointError(f"{ckpt.path}: {what}; widenet eval evaluates image classifiers{scores}")
    cfg = VisionConfig(**meta["model_config"])
    if (problem := channels_problem(cfg.in_channels)) is not None:
        raise ValueError(f"{ckpt.path}: {problem}")
    model = load_model(ckpt)
    stats = ckpt.image_stats or {}  # checked before the data is read
    if ema:
        _load_ema_weights(ckpt, model)
    train_cfg = meta.get("train_config", {})
    trained_on = meta.get("data", {}).get("name") or train_cfg.get("data")
    name = data or trained_on
    if not name:
        raise ValueError(f"{ckpt.path} does not say which data it was trained on; pass --data")
    recorded = data_dir is None and name == trained_on  # the run's folder holds its own data, not another set's
    if recorded:
        data_dir = train_cfg.get("data_dir")
        if data_dir is None and name == "folder":
            raise ValueError(f"{ckpt.path} was trained on an image folder it does not name (an export keeps no data "
                             "path); pass --data-dir")
    try:
        test = load_dataset(name, "test", data_dir, cfg.image_size, channels=cfg.in_channels,
                            resize=ckpt.image_resize)  # a folder's images as the model sees them (as predict does)
    except DatasetNotFoundError as err:
        if recorded and data_dir is not None:
            raise DatasetNotFoundError(f"{err} (the folder the run was trained on); pass --data-dir where it is "
                                       "now") from None
        raise
    if test_subset:
        test = subset(test, test_subset, train_cfg.get("seed", 0))
    if meta.get("data", {}).get("classes"):
        check_same_classes(meta["data"]["classes"], test, "the checkpoint's")
    if test.channels != cfg.in_channels or test.num_classes > cfg.num_classes:
        raise ValueError(f"dataset {name!r} ({counted(test.channels, 'channel')}, "
                         f"{counted(test.num_classes, 'class', 'classes')}) does not fit the checkpoint's model "
                         f"({counted(cfg.in_channels, 'channel')}, {counted(cfg.num_classes, 'class', 'classes')})")
    both = {"mean", "std"} <= stats.keys()  # else ViT's, as predict and the Hugging Face export take
    mean, std = (stats["mean"], stats["std"]) if both else fallback_stats(ckpt.path, cfg.in_channels)
    dev = resolve_device(device)
    with dropless_routing(model) if dropless else contextlib.nullcontext():
        result = evaluate(model.to(dev), test, batch_size, dev, mean, std, tta=tta)
    if not math.isfinite(result.loss):
        raise ValueError(non_finite_problem(ckpt.path, model))
    return dict(model=meta["model"], step=ckpt.step, data=name, checkpoint=str(ckpt.path), ema=ema, tta=tta,
                data_dir=None if data_dir is None else os.path.abspath(data_dir),
                batch_size=batch_size, dropless=dropless,
                **result.to_record())


def _load_ema_weights(ckpt: Source, model: nn.Module) -> None:
    try:
        model.load_state_dict(averaged_weights(ckpt))
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt.path}: averaged weights do not fit the model: {err}") from None
