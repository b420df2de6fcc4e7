"""A resumable step loop for the text tasks (pretraining and fine-tuning).

A task supplies three callables: `batches(epoch, start_batch)` (the epoch's
batches in an order fixed by (seed, epoch)), `step(batch, step_index)` (one
optimizer update, returning a `StepResult`) and `evaluate()` (a dict of
held-out metrics). The runner owns the rest: progress counters, the log
window, metrics.jsonl, the progress bar, checkpoints and `--resume`, and
stopping on a non-finite loss with the last good checkpoint left intact.

Every random draw inside a step must come from the global RNGs (their states
are checkpointed) or from generators seeded by (seed, step), so on CPU a run
killed and resumed ends exactly like an uninterrupted one.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from ..distributed.env import DistEnv
from ..distributed.parallel import ParallelContext
from .checkpoint import CheckpointError, capture_rng_state, find_latest_checkpoint, load_checkpoint, save_checkpoint
from .text_config import TextRunConfig


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says why."""


@dataclass
class StepResult:
    """One optimizer update: `loss` is checked for finiteness; `values` are averaged per log window."""

    loss: float
    values: dict[str, float]
    examples: int
    tokens: int


@dataclass
class LoopTask:
    """What the runner needs from a task."""

    steps_per_epoch: int
    total_steps: int
    batches: Callable[[int, int], Iterable[Any]]
    step: Callable[[Any, int], StepResult]
    evaluate: Callable[[], dict[str, Any]]
    eval_every: int | None = None  # None: after every epoch (and at the end)


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches done within `epoch`
    examples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0


@dataclass
class LogWindow:
    """Running sums between two log lines (saved in checkpoints for exact resume)."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, r: StepResult, seconds: float) -> None:
        for k, v in r.values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.examples += r.examples
        self.tokens += r.tokens
        self.seconds += seconds

    def record(self, p: Progress, lr: float) -> dict[str, Any]:
        n = max(self.steps, 1)
        speed = self.tokens / self.seconds if self.seconds else 0.0
        return dict(split="train", step=p.step, epoch=p.epoch, **{k: v / n for k, v in self.sums.items()},
                    lr=lr, tokens_per_s=speed)

    def summary(self, p: Progress, total: int) -> str:
        r = self.record(p, 0.0)
        values = " ".join(f"{k} {r[k]:.4f}" for k in self.sums)
        return f"step {p.step}/{total} {values} {r['tokens_per_s']:.0f} tokens/s"

    def state(self) -> dict[str, Any]:
        return dict(sums=dict(self.sums), steps=self.steps, examples=self.examples, tokens=self.tokens,
                    seconds=self.seconds)


@dataclass
class RunResult:
    steps: int
    final_eval: dict[str, Any]
    tokens_per_s: float
    examples_per_s: float


def resume_state(out: Path, cfg: TextRunConfig, model: nn.Module, optimizer, schedule, metrics,
                 log: Callable[[str], None], parallel: ParallelContext,
                 expected_meta: dict[str, Any] | None = None) -> tuple[Progress, LogWindow]:
    """Load OUT's latest checkpoint into model/optimizer/schedule/RNGs, or start fresh."""
    path = find_latest_checkpoint(out)
    if path is None:
        log(f"--resume: no checkpoint under {out}, starting from scratch")
        metrics.truncate_after(0)
        return Progress(), LogWindow()
    ckpt = load_checkpoint(path, model, expected_meta={"model": cfg.model, **(expected_meta or {})})
    saved = ckpt.meta.get("train_config", {})
    changed = cfg.resume_conflicts(saved)
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise CheckpointError(f"{path}: cannot resume with different settings ({detail})")
    state = ckpt.train_state
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    parallel.restore_rng_state(state["rng"])
    metrics.truncate_after(ckpt.step)
    log(f"resumed from {path} (step {ckpt.step})")
    return Progress(**state["progress"]), LogWindow(**state["window"])


def run_loop(task: LoopTask, cfg: TextRunConfig, model: nn.Module, optimizer, schedule, meta: dict[str, Any],
             log: Callable[[str], None] = print, parallel: ParallelContext | None = None,
             expected_meta: dict[str, Any] | None = None) -> RunResult:
    """Train for task.total_steps updates, evaluating and checkpointing on the way.

    `model` is the plain model (checkpoints, resume); the task's step trains
    through its own (possibly DDP-wrapped) view of it. On several processes
    every rank runs this loop; rank 0 alone writes metrics and checkpoints,
    the others wait for each save; every rank resumes from the same files,
    whose meta.json must hold `expected_meta` (e.g. the tokenizer).
    """
    parallel = parallel or ParallelContext(DistEnv())
    out = Path(cfg.out)
    metrics = parallel.metrics_log(out / "metrics.jsonl")
    if cfg.resume:
        progress, window = resume_state(out, cfg, model, optimizer, schedule, metrics, log, parallel, expected_meta)
    elif (out / "checkpoints").exists():
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue, or choose another --out")
    else:
        progress, window = Progress(), LogWindow()

    def checkpoint() -> None:
        state = dict(optimizer=optimizer.state_dict(), scheduler=schedule.state_dict(), rng=capture_rng_state(),
                     progress=vars(progress).copy(), window=window.state())
        if parallel.is_main:
            save_checkpoint(out, progress.step, model, state, dict(meta, epoch=progress.epoch), cfg.keep_last)
        parallel.barrier()

    def evaluate() -> dict[str, Any]:
        result = task.evaluate()
        metrics.write(dict(split="validation", step=progress.step, epoch=progress.epoch, **result))
        log(f"step {progress.step}: " + _format_eval(result))
        return result

    final: dict[str, Any] | None = None
    bar = tqdm(total=task.total_steps, initial=progress.step, unit="step", dynamic_ncols=True, leave=False,
               disable=not (parallel.is_main and sys.stderr.isatty()))
    while progress.step < task.total_steps:
        model.train()
        for batch in task.batches(progress.epoch, progress.batch):
            started = time.perf_counter()
            result = task.step(batch, progress.step)
            if not math.isfinite(result.loss):
                last = find_latest_checkpoint(out)
                kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was saved yet"
                raise TrainingError(f"loss became {result.loss} at step {progress.step + 1}; stopped ({kept}).")
            seconds = time.perf_counter() - started
            progress.step += 1
            progress.batch += 1
            progress.examples += result.examples
            progress.tokens += result.tokens
            progress.train_seconds += seconds
            window.add(result, seconds)
            bar.update(1)
            if progress.step % cfg.log_every == 0 or progress.step == task.total_steps:
                metrics.write(window.record(progress, schedule.get_last_lr()[0]))
                log(window.summary(progress, task.total_steps))
                window = LogWindow()
            if progress.step >= task.total_steps:
                break
            if task.eval_every and progress.step % task.eval_every == 0:
                final = evaluate()
                model.train()
                checkpoint()
            elif cfg.save_every and progress.step % cfg.save_every == 0:
                checkpoint()
        if progress.batch >= task.steps_per_epoch:
            progress.epoch += 1
            progress.batch = 0
        if task.eval_every is None or progress.step >= task.total_steps:
            final = evaluate()
            checkpoint()
    bar.close()
    if final is None:  # resumed a finished run: report without training
        final = task.evaluate()
    seconds = progress.train_seconds
    return RunResult(progress.step, final, progress.tokens / seconds if seconds else 0.0,
                     progress.examples / seconds if seconds else 0.0)


def _format_eval(result: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))


def warmup_steps(cfg: TextRunConfig, total: int) -> int:
    """cfg.warmup_steps, else the warmup fraction of the run (at most the whole run)."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_fraction * total)
    return min(warmup, total)


def seeded_generator(seed: int, step: int) -> torch.Generator:
    """A private generator for (seed, step): draws that must not depend on where a run resumed."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
