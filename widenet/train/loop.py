"""Image-classification training with exact resume (`widenet train`).

One step: augment a uint8 batch on the device, optional mixup with smoothed
targets, forward, loss = cross-entropy + aux_weight * summed MoE loss,
backward, global clip, optimizer and schedule step. Data order depends only
on (seed, epoch); every other random draw comes from the global RNGs, whose
states every checkpoint stores. So on CPU a run killed and resumed ends with
exactly the weights and metrics of an uninterrupted run.

Under torchrun the same loop runs in every process; ParallelContext
(widenet.distributed.parallel) holds what differs: the global batch is split
across ranks, the model is wrapped (DDP, FSDP or expert parallel), metrics
are reduced, and rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.augment import AugmentConfig, augment_batch, mixup, normalize, one_hot_smoothed
from ..data.vision import ImageDataset, iterate_batches, load_dataset, num_batches, subset
from ..distributed.env import DistEnv, main_process_first
from ..distributed.parallel import ParallelContext
from ..models.registry import count_parameters, create_model
from ..runtime import autocast, autocast_dtype, compiled_if, resolve_device
from .budget import BudgetPlan, Deadline, plan_budget
from .checkpoint import (CheckpointError, capture_rng_state, find_latest_checkpoint, load_checkpoint,
                         restore_rng_state, save_checkpoint)
from .config import TrainConfig, resume_conflicts
from .ema import ModelEMA
from .evaluate import EvalResult, evaluate
from .metrics import MetricsLog
from .optim import build_optimizer, build_schedule
from .runner import TrainingError


_SINGLE = ParallelContext(DistEnv())  # one process: every parallel step is the identity


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_eval: EvalResult
    params: int
    train_images_per_s: float
    model: nn.Module
    ema_eval: EvalResult | None = None  # of the averaged weights, with --ema-decay


@dataclass
class _Progress:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches done within `epoch`
    images: int = 0
    train_seconds: float = 0.0
    total: int = 0  # the run's planned steps (with --time-budget: re-planned after every epoch)
    wall_seconds: float = 0.0  # with --time-budget: seconds of the budget spent at the last checkpoint
    eval_seconds: float = 0.0  # how long the last evaluation took


def load_data(cfg: TrainConfig) -> tuple[ImageDataset, ImageDataset]:
    """Train and test sets, decoded once, optionally subsampled."""
    train = load_dataset(cfg.data, "train", cfg.data_dir, cfg.image_size, cfg.download)
    test = load_dataset(cfg.data, "test", cfg.data_dir, cfg.image_size, cfg.download)
    if cfg.train_subset:
        train = subset(train, cfg.train_subset, cfg.seed)
    if cfg.test_subset:
        test = subset(test, cfg.test_subset, cfg.seed)
    return train, test


def build_model_for(cfg: TrainConfig, data: ImageDataset) -> nn.Module:
    """The preset, sized for the data: classes, channels and image size follow it."""
    overrides = dict(num_classes=data.num_classes, in_channels=data.channels, image_size=data.image_size)
    if cfg.dropout:
        overrides["dropout"] = cfg.dropout
    overrides.update(cfg.model_overrides)
    return create_model(cfg.model, **overrides)


def train(cfg: TrainConfig, log: Callable[[str], None] = print,
          data: tuple[ImageDataset, ImageDataset] | None = None) -> TrainResult:
    """Run (or resume) training as `cfg` says; returns the final evaluation.

    Under torchrun (after init_distributed) every process calls it with the
    same cfg: see widenet.distributed.parallel for what then changes.
    """
    started = time.monotonic()  # a --time-budget counts from here
    parallel = ParallelContext.for_run(cfg.batch_size, cfg.seed, cfg.fsdp, cfg.expert_parallel)
    log = parallel.log(log)
    if cfg.time_budget is not None and parallel.distributed:
        raise ValueError("--time-budget plans a run on one process; under torchrun give --epochs or --max-steps")
    device = parallel.device(resolve_device(cfg.device))
    amp = autocast_dtype(cfg.amp, device)
    out = Path(cfg.out)
    train_set, test_set = data if data is not None else _load_data_once(cfg, parallel)
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, train_set).to(device)
    per_epoch = num_batches(len(train_set), cfg.batch_size, drop_last=False)
    parallel.check_epoch(len(train_set), cfg.batch_size)
    augment = AugmentConfig(crop=cfg.crop, flip=cfg.flip, randaugment_n=cfg.randaugment_n,
                            randaugment_m=cfg.randaugment_m)
    mean, std = train_set.mean, train_set.std
    metrics = parallel.metrics_log(out / "metrics.jsonl")
    meta = dict(model=cfg.model, model_config=model.cfg.to_dict(), train_config=cfg.to_dict(),
                data=dict(name=cfg.data, classes=train_set.classes, mean=list(mean), std=list(std)))
    params = count_parameters(model)

    saved = None
    if cfg.resume:
        saved = _resume_weights(out, cfg, model, metrics, log)  # into the plain model, on every rank
    elif (out / "checkpoints").exists():
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue, or choose another --out")
    deadline: Deadline | None = None
    if cfg.time_budget is None:
        total = cfg.max_steps or cfg.epochs * per_epoch
    elif saved is not None:  # the plan as it stood at the checkpoint; the deadline resumes below
        total = saved["progress"]["total"]
    else:
        plan = _plan_time_budget(cfg, model, (train_set, test_set), device, amp, augment, per_epoch, started)
        log(plan.describe(per_epoch))
        if plan.steps == 0:
            raise ValueError(f"--time-budget {cfg.time_budget:g} min does not fit one training step and the "
                             f"final evaluation ({plan.describe(per_epoch)})")
        total = plan.steps
        deadline = Deadline(plan.budget_s, per_epoch, cfg.eval_every, plan.step_s, plan.eval_s, started)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_fraction * total)
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay else None  # the plain model's copy
    model = parallel.wrap(model, device)
    net = compiled_if(cfg.compile, model, device)  # what the training steps run
    optimizer = build_optimizer(cfg.optimizer, parallel.module(model), cfg.lr, cfg.weight_decay)
    schedule = build_schedule(optimizer, min(warmup, total), total, cfg.schedule)
    progress, window_state = _Progress(total=total, eval_seconds=deadline.eval_s if deadline else 0.0), {}
    if saved is not None:
        progress, window_state = _resume_state(saved, model, optimizer, schedule, parallel, log, ema)
        progress.total = total  # checkpoints from before the field existed
        if cfg.time_budget is not None:
            deadline = Deadline(60.0 * cfg.time_budget, per_epoch, cfg.eval_every,
                                progress.train_seconds / max(progress.step, 1), progress.eval_seconds, started,
                                spent_before=progress.wall_seconds)

    workers = f", {parallel.env.world_size} processes ({parallel.mode})" if parallel.distributed else ""
    log(f"training {cfg.model} ({params / 1e6:.3f}M params) on {cfg.data}: {len(train_set)} images, "
        f"{total} steps, batch {cfg.batch_size}, {device}" + (f", {amp}" if amp else "") + workers
        + (", compiled (the first steps compile)" if cfg.compile else ""))

    window = _Window(**window_state)

    def calibrate_average() -> None:
        """Recompute the weight average's BatchNorm statistics, unless done since its last update."""
        if ema is not None and ema.calibrated_at != ema.updates:
            with autocast(device, amp):
                ema.recalibrate_batch_norm(_calibration_inputs(train_set, cfg, device, mean, std))

    def epochs() -> int:
        return math.ceil(progress.total / per_epoch)

    def checkpoint() -> None:
        if deadline is not None:
            progress.wall_seconds = deadline.spent()
        calibrate_average()  # so that `widenet eval --ema` of any checkpoint finds fitting statistics
        weights = parallel.model_state(model)  # collectives (if any) run on every rank
        state = dict(optimizer=parallel.optimizer_state(model, optimizer), scheduler=schedule.state_dict(),
                     rng=capture_rng_state(), progress=vars(progress).copy(), window=vars(window).copy())
        if ema is not None:
            state["ema"] = ema.state_dict()
        if parallel.is_main:
            save_checkpoint(out, progress.step, weights, state, dict(meta, epoch=progress.epoch), cfg.keep_last)
        parallel.barrier()

    def evaluate() -> tuple[EvalResult, EvalResult | None]:
        """The trained weights' and (with --ema-decay) the averaged weights' test results."""
        final = parallel.evaluate(model, test_set, cfg.eval_batch_size, device, mean, std, amp, cfg.tta)
        if ema is None:
            return final, None
        calibrate_average()
        return final, parallel.evaluate(ema.module, test_set, cfg.eval_batch_size, device, mean, std, amp, cfg.tta)

    def log_evaluation(final: EvalResult, final_ema: EvalResult | None) -> None:
        at = dict(step=progress.step, epoch=progress.epoch, tta=cfg.tta)
        metrics.write(dict(split="test", **at, **final.to_record()))
        averaged = ""
        if final_ema is not None:
            metrics.write(dict(split="test_ema", **at, **final_ema.to_record()))
            averaged = f" (EMA weights: accuracy {final_ema.accuracy:.4f} loss {final_ema.loss:.4f})"
        views = ""
        if final.single_accuracy is not None:
            views = (f" ({cfg.tta} TTA; single images: accuracy {final.single_accuracy:.4f} "
                     f"loss {final.single_loss:.4f})")
        log(f"epoch {progress.epoch}/{epochs()} step {progress.step}: test accuracy {final.accuracy:.4f} "
            f"loss {final.loss:.4f}{views}{averaged}")

    def replan(steps: int, seconds: float) -> None:
        """Fit the rest of the run into the time left, with this epoch's `steps` taking `seconds`."""
        deadline.observe_steps(steps, seconds)
        planned = deadline.steps(progress.step)
        if planned != progress.total:
            log(f"time budget: {deadline.budget_s - deadline.spent():.0f} s left, "
                f"{1000 * deadline.step_s:.1f} ms per step, {deadline.eval_s:.1f} s per evaluation: "
                f"{progress.total} -> {planned} steps")
            progress.total = planned
            schedule.lr_lambdas[0].total_steps = planned
            bar.total = planned

    final: EvalResult | None = None
    final_ema: EvalResult | None = None
    bar = _progress_bar(total, progress.step, parallel.is_main)
    mark = time.monotonic()
    while progress.step < progress.total:
        first = progress.step
        model.train()
        batches = iterate_batches(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                  epoch=progress.epoch, start_batch=progress.batch)
        for images, labels in batches:
            started = time.perf_counter()
            loss, aux, correct = _train_step(net, optimizer, schedule, images.to(device), labels.to(device),
                                             cfg, augment, mean, std, train_set.num_classes, device, amp,
                                             parallel, progress.step)
            if not math.isfinite(loss):
                last = find_latest_checkpoint(out)
                kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was saved yet"
                raise TrainingError(f"loss became {loss} at step {progress.step + 1}; stopped ({kept}).")
            if ema is not None:
                ema.update(parallel.module(model))
            seconds = time.perf_counter() - started
            progress.step += 1
            progress.batch += 1
            progress.images += labels.numel()
            progress.train_seconds += seconds
            window.add(loss, aux, correct, labels.numel(), seconds)
            bar.update(1)
            bar.set_postfix_str(window.postfix(), refresh=False)
            if progress.step % cfg.log_every == 0 or progress.step == progress.total:
                metrics.write(window.record(progress, schedule.get_last_lr()[0]))
                log(window.summary(progress, progress.total))
                window.reset()
            if progress.step >= progress.total:
                break
            # The epoch's last step is saved after its evaluation, below.
            if cfg.save_every and progress.step % cfg.save_every == 0 and progress.batch < per_epoch:
                checkpoint()
        if progress.batch >= per_epoch:
            progress.epoch += 1
            progress.batch = 0
        if deadline is not None:
            replan(progress.step - first, time.monotonic() - mark)
        if progress.step >= progress.total or progress.epoch % cfg.eval_every == 0:
            mark = time.monotonic()
            final, final_ema = evaluate()
            log_evaluation(final, final_ema)
            progress.eval_seconds = time.monotonic() - mark
            if deadline is not None:
                deadline.eval_s = progress.eval_seconds
        else:
            log(f"epoch {progress.epoch}/{epochs()} step {progress.step} (evaluated every {cfg.eval_every} epochs)")
        mark = time.monotonic()  # the checkpoint counts towards the next epoch's step time
        checkpoint()
    bar.close()
    if final is None:  # resumed a finished run: report without training
        final, final_ema = evaluate()
    speed = progress.images / progress.train_seconds if progress.train_seconds else 0.0
    return TrainResult(out, progress.step, final, params, speed, parallel.module(model), final_ema)


def _plan_time_budget(cfg: TrainConfig, model: nn.Module, data: tuple[ImageDataset, ImageDataset], device,
                      amp, augment: AugmentConfig, per_epoch: int, started: float) -> BudgetPlan:
    """How many steps fit in --time-budget: timed on throwaway copies of the model and optimizer
    (the global RNG states are restored afterwards, so training draws what it would have drawn)."""
    train_set, test_set = data
    rng = capture_rng_state()
    twin = copy.deepcopy(model).train()
    optimizer = build_optimizer(cfg.optimizer, twin, cfg.lr, cfg.weight_decay)
    schedule = build_schedule(optimizer, 0, 1, "constant")
    ema = ModelEMA(twin, cfg.ema_decay) if cfg.ema_decay else None
    batches = _endless_batches(train_set, cfg.batch_size, cfg.seed)
    mean, std = train_set.mean, train_set.std

    def step() -> None:
        images, labels = next(batches)
        _train_step(twin, optimizer, schedule, images.to(device), labels.to(device), cfg, augment, mean, std,
                    train_set.num_classes, device, amp)
        if ema is not None:
            ema.update(twin)

    part = subset(test_set, min(len(test_set), 2 * cfg.eval_batch_size), cfg.seed)

    def evaluate_part() -> None:
        evaluate(twin, part, cfg.eval_batch_size, device, mean, std, amp, cfg.tta)

    try:
        return plan_budget(cfg.time_budget, lambda: time.monotonic() - started, step, evaluate_part,
                           len(part) / len(test_set), per_epoch, cfg.eval_every, 2 if ema else 1)
    finally:
        restore_rng_state(rng)


def _endless_batches(data: ImageDataset, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches in the order of epochs 0, 1, 2, ... without end."""
    for epoch in itertools.count():
        yield from iterate_batches(data, batch_size, shuffle=True, seed=seed, epoch=epoch)


def _load_data_once(cfg: TrainConfig, parallel: ParallelContext) -> tuple[ImageDataset, ImageDataset]:
    """load_data(); on several processes rank 0 first (it may download), then the others from its cache."""
    if not parallel.distributed:
        return load_data(cfg)
    with main_process_first():
        return load_data(cfg)


EMA_CALIBRATION_BATCHES = 20


def _calibration_inputs(data: ImageDataset, cfg: TrainConfig, device, mean, std) -> Iterator[torch.Tensor]:
    """The same normalised, unaugmented training batches every time: the first EMA_CALIBRATION_BATCHES
    of epoch 0's order (batch size as in training), for the weight average's BatchNorm statistics."""
    batches = iterate_batches(data, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=0)
    for images, _ in itertools.islice(batches, EMA_CALIBRATION_BATCHES):
        yield normalize(images.to(device), mean, std)


def _progress_bar(total: int, done: int, show: bool = True) -> tqdm:
    """A live bar (loss, accuracy, images/s) on a terminal; silent in logs, in CI and on ranks > 0."""
    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, leave=False,
                disable=not (show and sys.stderr.isatty()))


def _train_step(model, optimizer, schedule, images, labels, cfg: TrainConfig, augment: AugmentConfig,
                mean, std, num_classes: int, device, amp, parallel: ParallelContext | None = None,
                step: int = 0) -> tuple[float, float, int]:
    """One update on a global batch (uint8 images (B, C, H, W), labels (B,)); returns global
    (mean task loss, mean aux loss, correct predictions). On several processes each rank
    augments the whole batch (the same draws everywhere) and trains on its slice."""
    parallel = parallel or _SINGLE
    x = augment_batch(images, augment, mean, std)  # (B, C, H, W) float
    targets = one_hot_smoothed(labels, num_classes, cfg.label_smoothing)  # (B, K)
    if cfg.mixup > 0:
        x, targets = mixup(x, targets, cfg.mixup)
    x, targets, mine = parallel.shard(x), parallel.shard(targets), parallel.shard(labels)  # (b, ...) b = B / W
    with parallel.forward_rng(step, device), autocast(device, amp):
        out = model(x)
        task = F.cross_entropy(out.logits.float(), targets)
        scale = parallel.loss_scale(len(mine), len(labels))  # 1.0 unless the last batch splits unevenly
        loss = (task if scale == 1.0 else task * scale) + cfg.aux_weight * out.aux_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parallel.after_backward()
    parallel.clip_grad_norm(model, cfg.clip_norm)
    optimizer.step()
    schedule.step()
    correct = int((out.logits.argmax(-1) == mine).sum())
    return parallel.reduce_step(task.detach(), out.aux_loss.detach(), correct, len(mine), len(labels))


@dataclass
class _Window:
    """Running sums between two log lines (saved in checkpoints for exact resume)."""

    loss: float = 0.0
    aux: float = 0.0
    seconds: float = 0.0
    correct: int = 0
    images: int = 0
    steps: int = 0

    def reset(self) -> None:
        self.__dict__.update(vars(_Window()))

    def add(self, loss: float, aux: float, correct: int, images: int, seconds: float) -> None:
        self.loss += loss
        self.aux += aux
        self.correct += correct
        self.images += images
        self.seconds += seconds
        self.steps += 1

    def record(self, p: _Progress, lr: float) -> dict:
        n = max(self.steps, 1)
        return dict(split="train", step=p.step, epoch=p.epoch, loss=self.loss / n, aux_loss=self.aux / n,
                    accuracy=self.correct / max(self.images, 1), lr=lr,
                    images_per_s=self.images / self.seconds if self.seconds else 0.0)

    def postfix(self) -> str:
        n = max(self.steps, 1)
        speed = self.images / self.seconds if self.seconds else 0.0
        return f"loss {self.loss / n:.3f} acc {self.correct / max(self.images, 1):.3f} {speed:.0f} img/s"

    def summary(self, p: _Progress, total: int) -> str:
        r = self.record(p, 0.0)
        return (f"step {p.step}/{total} loss {r['loss']:.4f} acc {r['accuracy']:.3f} "
                f"aux {r['aux_loss']:.3f} {r['images_per_s']:.0f} img/s")


def _resume_weights(out: Path, cfg: TrainConfig, model: nn.Module, metrics: MetricsLog,
                    log: Callable[[str], None]) -> dict | None:
    """Load the latest checkpoint's weights into the (unwrapped) model; its train state, or None."""
    path = find_latest_checkpoint(out)
    if path is None:
        log(f"--resume: no checkpoint under {out}, starting from scratch")
        metrics.truncate_after(0)  # records of the lost attempt would be duplicated
        return None
    ckpt = load_checkpoint(path, model, expected_meta={"model": cfg.model})
    saved = ckpt.meta.get("train_config", {})
    changed = resume_conflicts(saved, cfg)
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise CheckpointError(f"{path}: cannot resume with different settings ({detail})")
    metrics.truncate_after(ckpt.step)
    return dict(ckpt.train_state, path=str(path), step=ckpt.step)


def _resume_state(saved: dict, model: nn.Module, optimizer, schedule, parallel: ParallelContext,
                  log: Callable[[str], None], ema: ModelEMA | None = None) -> tuple[_Progress, dict]:
    """Optimizer, schedule, RNG, counters and the weight average from a checkpoint's train state."""
    parallel.load_optimizer_state(model, optimizer, saved["optimizer"])
    schedule.load_state_dict(saved["scheduler"])
    parallel.restore_rng_state(saved["rng"])
    if ema is not None and "ema" in saved:
        ema.load_state_dict(saved["ema"])
    elif ema is not None:
        log("--ema-decay: the checkpoint holds no weight average; it starts from the resumed weights")
    log(f"resumed from {saved['path']} (step {saved['step']})")
    return _Progress(**saved["progress"]), dict(saved.get("window", {}))


__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train", "load_data", "build_model_for"]
