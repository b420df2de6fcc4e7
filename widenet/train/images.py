"""Image classification (`widenet train`): the task the Trainer runs.

One step: augment a uint8 batch on the device, optional mixup with smoothed
targets, forward, loss = cross-entropy + aux_weight * summed MoE loss. Data
order depends only on (seed, epoch); every other random draw comes from the
global RNGs. Under torchrun every rank augments the whole global batch (the
same draws everywhere) and trains on its slice (widenet.distributed.parallel).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import augment_batch, mixup, normalize, one_hot_smoothed
from ..data.batches import num_batches
from ..data.images import (RESIZE_RESAMPLE, ImageDataset, channels_problem, check_classification_pair, iterate_batches,
                           load_dataset, resize_dataset, subset)
from ..distributed.env import main_process_first
from ..distributed.parallel import ParallelContext
from ..listing import counted, listed
from ..memory import check_activations_fit
from ..models.registry import apply_overrides, count_parameters, create_model, model_config, require_preset_kind
from ..models.vision import VisionConfig, VisionTransformer
from ..runtime import autocast, autocast_dtype, resolve_device
from .budget import Cadence, time_per_call
from .config import TrainConfig
from .exported import Source, init_source, weights_from
from .evaluate import EvalResult, evaluate, evaluate_on
from .progress import StepResult
from .run_folder import claim_run_folder
from .trainer import Trainer, TrainingError

EMA_CALIBRATION_BATCHES = 20


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_eval: EvalResult
    params: int
    train_images_per_s: float
    model: nn.Module
    ema_eval: EvalResult | None = None  # of the averaged weights, with --ema-decay


def load_data(cfg: TrainConfig, source: Source | None = None) -> tuple[ImageDataset, ImageDataset]:
    """Train and test sets, decoded once, subsampled, then resized (--image-size), and checked to
    make one classification task (check_classification_pair). A folder's images are decoded at
    --image-size, by default at the model's own image size; every dataset is converted to the
    model's channels (folder_image_size, image_channels; `source`: the --init model, which decides
    both): an RGB model fine-tunes on grey images as RGB ones, a grey model on colour ones in grey."""
    at_load = folder_image_size(cfg, source) if cfg.data == "folder" else None
    channels = image_channels(cfg, source)
    splits = []
    for split, size in (("train", cfg.train_subset), ("test", cfg.test_subset)):
        data = load_dataset(cfg.data, split, cfg.data_dir, at_load, cfg.download, channels)
        data = subset(data, size, cfg.seed) if size else data
        splits.append(resize_dataset(data, cfg.image_size) if cfg.image_size and not at_load else data)
    check_classification_pair(*splits)
    return splits[0], splits[1]


def folder_image_size(cfg: TrainConfig, source: Source | None = None) -> int | None:
    """The size an image folder is decoded at: --image-size, else the model's image size
    (an image_size model override, else the --init model's or the preset's)."""
    if cfg.image_size is not None:
        return cfg.image_size
    return _model_setting(cfg, source, "image_size")


def image_channels(cfg: TrainConfig, source: Source | None = None) -> int | None:
    """The channels the images are converted to: the model's when it has its own (an in_channels
    model override, or the --init model's: a grey model reads grey images), else None (the data's
    own; an image folder's: RGB)."""
    if cfg.model_overrides.get("in_channels") is None and source is None:
        return None
    channels = _model_setting(cfg, source, "in_channels")
    own = source.meta["model_config"].get("in_channels") if source is not None else None
    if own is not None and channels != own:  # (before the data are read: they would be converted to either)
        raise ValueError(f"--set in_channels={channels}: the --init model {source.path} takes {own}-channel images "
                         "(its patch weights are for them); leave in_channels out: the images are converted to its "
                         "channels")
    if (problem := channels_problem(channels)) is not None:
        raise ValueError(f"{source.path}: {problem}" if own is not None else
                         f"--set in_channels={channels}: images are read as grey (1) or RGB (3); leave in_channels out")
    return channels


def _model_setting(cfg: TrainConfig, source: Source | None, name: str) -> Any:
    if cfg.model_overrides.get(name) is not None:
        return cfg.model_overrides[name]
    if source is not None:
        return source.meta["model_config"].get(name)
    return getattr(model_config(cfg.model), name, None)


def read_init(cfg: TrainConfig) -> Source | None:
    """The --init model (an image model, or ValueError), or None without --init."""
    if not cfg.init:
        return None
    return init_source(cfg.init, cfg.out, cfg.resume, kind="vision")


def build_model_for(cfg: TrainConfig, data: ImageDataset, source: Source | None = None) -> nn.Module:
    """The preset (or, with --init, the starting model's config and weights; `source` when read
    already), sized for the data: classes, channels and image size follow it. With --init, a head
    of another class count starts new."""
    overrides = dict(num_classes=data.num_classes, in_channels=data.channels, image_size=data.image_size)
    if cfg.dropout:
        overrides["dropout"] = cfg.dropout
    overrides.update(cfg.model_overrides)
    _check_fits_data(overrides, data, cfg)
    if not cfg.init:
        return create_model(cfg.model, **overrides)
    source = source or read_init(cfg)
    model = VisionTransformer(apply_overrides(VisionConfig(**source.meta["model_config"]), overrides))
    weights_from(source, model, skip_heads=True)
    model.model_name = source.meta.get("model") or cfg.model
    return model


def _check_size_before_loading(cfg: TrainConfig, source: Source | None) -> None:
    """The image size refused before the data is read and decoded (a large folder takes minutes):
    one that the --init model's position embeddings cannot take, or that its patches do not divide."""
    size = folder_image_size(cfg, source) if cfg.data == "folder" else cfg.image_size
    if size is None:
        return
    if source is not None:
        own = source.meta["model_config"].get("image_size")
        if cfg.image_size is not None and cfg.image_size != own and "image_size" not in cfg.model_overrides:
            raise ValueError(f"--image-size {cfg.image_size}: the --init model {source.path} takes {own} px images "
                             f"(its position embeddings are for that size); pass --image-size {own} or leave it out")
        apply_overrides(VisionConfig(**source.meta["model_config"]), dict(cfg.model_overrides, image_size=size))
    else:  # the config is built for its checks (a size its patches divide)
        model_config(cfg.model, **dict(cfg.model_overrides, image_size=size))


def _check_fits_data(overrides: dict[str, Any], data: ImageDataset, cfg: TrainConfig) -> None:
    """A --set of num_classes, in_channels or image_size that the data contradicts, named before
    the run starts (not as a loss-shape error at its first step)."""
    name = f"the image folder {cfg.data_dir}" if cfg.data == "folder" else cfg.data
    if overrides["num_classes"] != data.num_classes:
        raise ValueError(f"--set num_classes={overrides['num_classes']}: {name} has {data.num_classes} classes "
                         "(a model's classes follow its data: leave num_classes out)")
    if overrides["in_channels"] != data.channels:  # data given to train() (load_data converts them)
        raise ValueError(f"--set in_channels={overrides['in_channels']}: {name}'s images have {data.channels} "
                         "channel(s) (leave in_channels out)")
    if overrides["image_size"] != data.image_size:
        if not isinstance(overrides["image_size"], int) or overrides["image_size"] < 1:
            raise ValueError(f"--set image_size={overrides['image_size']}: image_size must be a positive integer")
        fix = ("give --image-size and --set image_size the same size" if cfg.image_size is not None else
               f"to train at another size, resize them with --image-size {overrides['image_size']}")
        raise ValueError(f"--set image_size={overrides['image_size']}: {name}'s images are {data.image_size}x"
                         f"{data.image_size}" + (" after --image-size" if cfg.image_size is not None else "")
                         + f"; {fix}")


class ImageTask:
    """Classification of augmented images: batches, loss, test-set evaluation (see the Trainer's Task)."""

    unit, split = "images", "test"

    def __init__(self, cfg: TrainConfig, data: tuple[ImageDataset, ImageDataset], parallel: ParallelContext,
                 device: torch.device, amp: torch.dtype | None) -> None:
        self.cfg, (self.train_set, self.test_set) = cfg, data
        self.parallel, self.device, self.amp = parallel, device, amp
        self.steps_per_epoch = num_batches(len(self.train_set), cfg.batch_size, drop_last=False)
        self.cadence = Cadence(self.steps_per_epoch, every_epochs=cfg.eval_every)
        self.augment = cfg.augment_config()
        self.mean, self.std = self.train_set.mean, self.train_set.std

    def batches(self, epoch: int, start_batch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return iterate_batches(self.train_set, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed, epoch=epoch,
                               start_batch=start_batch)

    def loss(self, net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int
             ) -> tuple[torch.Tensor, Callable[[], StepResult]]:
        """uint8 images (B, C, H, W), labels (B,) -> the loss of this rank's slice, and the step's global
        (mean task loss, mean aux loss, accuracy) once the update is done."""
        cfg, parallel, device = self.cfg, self.parallel, self.device
        images, labels = batch[0].to(device), batch[1].to(device)
        x = augment_batch(images, self.augment, self.mean, self.std)  # (B, C, H, W) float
        targets = one_hot_smoothed(labels, self.train_set.num_classes, cfg.label_smoothing)  # (B, K)
        if cfg.mixup > 0:
            x, targets = mixup(x, targets, cfg.mixup)
        x, targets, mine = parallel.shard(x), parallel.shard(targets), parallel.shard(labels)  # (b, ...) b = B / W
        with parallel.forward_rng(step, device), autocast(device, self.amp):
            out = net(x)
            task = F.cross_entropy(out.logits.float(), targets)
            scale = parallel.loss_scale(len(mine), len(labels))  # 1.0 unless the last batch splits unevenly
            loss = (task if scale == 1.0 else task * scale) + cfg.aux_weight * out.aux_loss

        def result() -> StepResult:
            correct = int((out.logits.argmax(-1) == mine).sum())
            task_loss, aux, correct = parallel.reduce_step(task.detach(), out.aux_loss.detach(), correct,
                                                           len(mine), len(labels))
            return StepResult(task_loss, dict(loss=task_loss, aux_loss=aux, accuracy=correct / len(labels)),
                              len(labels))

        return loss, result

    def evaluate(self, model: nn.Module) -> EvalResult:
        return evaluate_on(self.parallel, model, self.test_set, self.cfg.eval_batch_size, self.device, self.mean,
                           self.std, self.amp, self.cfg.tta)

    def record(self, result: EvalResult) -> dict[str, Any]:
        return dict(tta=self.cfg.tta, **result.to_record())

    def describe(self, result: EvalResult) -> str:
        views = ""
        if result.single_accuracy is not None:
            views = (f" ({self.cfg.tta} TTA; single images: accuracy {result.single_accuracy:.4f} "
                     f"loss {result.single_loss:.4f})")
        return f"test accuracy {result.accuracy:.4f} loss {result.loss:.4f}{views}"

    def time_evaluation(self, model: nn.Module) -> float:
        """An evaluation of at most two batches of test images, scaled to the whole test set."""
        part = subset(self.test_set, min(len(self.test_set), 2 * self.cfg.eval_batch_size), self.cfg.seed)
        seconds = time_per_call(lambda: evaluate(model, part, self.cfg.eval_batch_size, self.device, self.mean,
                                                 self.std, self.amp, self.cfg.tta),
                                warmup=1, min_calls=1, min_seconds=0.0)
        return seconds * len(self.test_set) / len(part)

    def calibration_inputs(self) -> Iterator[torch.Tensor]:
        """The same normalised, unaugmented training batches every time: the first
        EMA_CALIBRATION_BATCHES of epoch 0's order (batch size as in training)."""
        batches = iterate_batches(self.train_set, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed, epoch=0)
        for images, _ in itertools.islice(batches, EMA_CALIBRATION_BATCHES):
            yield normalize(images.to(self.device), self.mean, self.std)


def train(cfg: TrainConfig, log: Callable[[str], None] = print,
          data: tuple[ImageDataset, ImageDataset] | None = None) -> TrainResult:
    """Run (or resume) training as `cfg` says; returns the final evaluation.

    Under torchrun (after init_distributed) every process calls it with the
    same cfg: see widenet.distributed.parallel for what then changes.
    """
    started = time.monotonic()
    if cfg.init is None:  # (with --init the starting point's model is trained, checked when read)
        require_preset_kind(cfg.model, "vision", "widenet train")
    cfg = cfg.with_absolute_paths()  # recorded so: eval and --resume find them from anywhere
    parallel = ParallelContext.for_run(cfg.batch_size, cfg.seed, cfg.fsdp, cfg.expert_parallel)
    device = parallel.device(resolve_device(cfg.device))
    amp = autocast_dtype(cfg.amp, device)
    source = read_init(cfg)  # read once: it decides how a folder is decoded and what the model is
    _check_size_before_loading(cfg, source)
    train_set, test_set = data if data is not None else _load_data_once(cfg, parallel, source)
    if train_set.constant_channels:
        warnings.warn(f"{train_set.name}: channel(s) {', '.join(map(str, train_set.constant_channels))} of "
                      "the training images never vary: normalised by their mean only (their std is 0)", stacklevel=2)
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, train_set, source).to(device)
    batch = min(cfg.batch_size, len(train_set))  # a --batch-size beyond the training set takes all of it
    if parallel.checks_host_memory(device):
        tokens = model.cfg.num_patches + (model.cfg.pool == "token")
        check_activations_fit(batch, tokens, model.cfg.encoder, f"the activations of a batch of "
                              f"{batch} images of {model.cfg.image_size} px ({tokens} tokens each)", amp)
    if cfg.init:  # the run trains the starting point's model, whatever --model says
        cfg = dataclasses.replace(cfg, model=model.model_name)
    parallel.check_epoch(len(train_set), cfg.batch_size)
    task = ImageTask(cfg, (train_set, test_set), parallel, device, amp)
    same_data = dict(classes=train_set.classes)  # what --resume must find again
    if train_set.contents is not None:  # an image folder, whose files can change under its name
        same_data["contents"] = train_set.contents
    if test_set.contents is not None:  # the folder's test split, which the run's scores are measured on
        same_data["test_contents"] = test_set.contents
    data_meta = dict(name=cfg.data, mean=list(task.mean), std=list(task.std), **same_data)
    if cfg.image_size is not None and cfg.data != "folder":  # resize_dataset's way (also at the data's own
        # size, where it changed nothing): predict resizes files of other sizes alike
        data_meta["resize"] = dict(crop=True, resample=RESIZE_RESAMPLE)
    meta = dict(model=cfg.model, model_config=model.cfg.to_dict(), train_config=cfg.to_dict(), data=data_meta)
    params = count_parameters(model)
    with claim_run_folder(cfg.out, cfg.resume, cfg.overwrite, parallel, log):
        trainer = Trainer(cfg, task, model, parallel, device, amp, meta, log, started=started,  # budget: loading too
                          expected_meta=dict(data=same_data))
        workers = f", {parallel.env.world_size} processes ({parallel.mode})" if parallel.distributed else ""
        trainer.log(f"training {cfg.model} ({params / 1e6:.3f}M params) on {cfg.data}: "
                    f"{counted(len(train_set), 'image')}, {counted(trainer.progress.total, 'step')}, batch {batch}"
                    + (" (all of them)" if batch < cfg.batch_size else "")
                    + f", {device}" + (f", {amp}" if amp else "")
                    + workers + (", compiled (the first steps compile)" if cfg.compile else ""))
        note = init_head_note(source, train_set.classes) if trainer.progress.step == 0 else None
        if note:
            trainer.log(note)
        run = trainer.run()
        return TrainResult(Path(cfg.out), run.steps, run.final_eval, params, run.examples_per_s, run.net, run.ema_eval)


def init_head_note(source: Source | None, classes: list[str]) -> str | None:
    """What becomes of the --init model's head on data of these classes, when the user should know:
    another class count starts a new head; the same count under other names (or in another order)
    keeps the head, whose output i then stands for the data's class i."""
    if source is None:
        return None
    count = source.meta["model_config"].get("num_classes")
    if count not in (None, len(classes)):
        return f"note: the --init model classifies {count} classes, the data has {len(classes)}: its head starts new"
    own = source.classes
    if own is None or own == classes or len(own) != len(classes):
        return None
    order = "in another order" if sorted(own) == sorted(classes) else "under other names"
    return (f"note: the --init model's {len(own)} classes are the data's {order} (its: {listed(own)}; "
            f"the data's: {listed(classes)}): its head is kept, output i now standing for the data's class i")


def _load_data_once(cfg: TrainConfig, parallel: ParallelContext,
                    source: Source | None) -> tuple[ImageDataset, ImageDataset]:
    """load_data(); on several processes rank 0 first (it may download), then the others from its cache."""
    if not parallel.distributed:
        return load_data(cfg, source)
    with main_process_first():
        return load_data(cfg, source)


__all__ = ["ImageTask", "TrainConfig", "TrainResult", "TrainingError", "build_model_for",
           "folder_image_size", "image_channels", "init_head_note", "load_data", "read_init", "train"]
