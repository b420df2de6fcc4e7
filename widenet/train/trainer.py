"""One training loop for every task: image classification, masked-LM pretraining, fine-tuning.

A Task supplies what differs (see the protocol below): its batches, the loss of
one global batch, and what evaluation reports. The Trainer owns the rest:

    resume (weights before the model is wrapped, then optimizer, schedule, RNGs,
      counters, log window, weight average and time-budget plan), the update step
      (widenet.train.update: backward, parallel hooks, global-norm clipping, optimizer,
      schedule, float16's loss scale), the non-finite guard on every step value, the
      log window, metrics.jsonl (and with --tensorboard the
      same records as TensorBoard events, widenet.train.tensorboard), the progress bar,
      evaluation and checkpoint cadence, the weight average (--ema-decay), the
      time budget (--time-budget, widenet.train.budget) and stopping on Ctrl-C,
      SIGTERM or SIGHUP after saving a checkpoint (widenet.train.stopping).

Every random draw in a step comes from the global RNGs (checkpointed) or from
generators seeded by (seed, step), so on CPU a run killed and resumed ends with
exactly the weights and metrics of an uninterrupted one. Under torchrun the same
loop runs on every process; ParallelContext (widenet.distributed.parallel) holds
what differs, and rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn
from tqdm import tqdm

from ..distributed.parallel import ParallelContext
from ..listing import counted
from ..memory import check_fits_memory, parameter_bytes
from ..rng import capture_rng_state, restore_rng_state
from ..runtime import autocast, compiled_if, first_line
from .budget import BudgetPlan, Cadence, Deadline, plan_budget
from .checkpoint import (CheckpointError, SettingsChanged, checkpoint_dir_name, find_latest_checkpoint, list_checkpoints,
                         load_checkpoint, read_checkpoint_meta, save_checkpoint)
from .config import RecipeConfig
from .ema import ModelEMA
from .evaluate import drop_note
from .metrics import NullMetrics
from .optim import build_optimizer, build_schedule
from .progress import LogWindow, Progress, StepResult
from .run_folder import drop_set_aside, replaces_earlier_run
from .setting_changes import changed_settings, unrecorded
from .stopping import StopRequest, TrainingStopped, stop_on_signals
from .tensorboard import open_metrics
from .update import apply_update, loss_scaler

TRAIN_STATE_KEYS = ("optimizer", "scheduler", "rng", "progress")  # what a resume needs from state.pt


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says why."""


class Task(Protocol):
    """What a kind of training supplies to the Trainer."""

    unit: str  # what the speed counts: "images" or "tokens"
    split: str  # the metrics.jsonl split of evaluations: "test", "validation"
    steps_per_epoch: int
    cadence: Cadence  # when to evaluate: every N epochs or every N steps, and at the end

    def batches(self, epoch: int, start_batch: int) -> Iterable[Any]:
        """The epoch's global batches from `start_batch` on, in an order fixed by (seed, epoch)."""

    def loss(self, net: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, Callable[[], StepResult]]:
        """Forward this process's rows of the global batch through `net`: the loss to differentiate
        (scaled so that averaging over processes gives the global mean), and a function that gives
        the step's global values once the update is done (reading numbers earlier would make the
        host wait for the device before backward)."""

    def evaluate(self, model: nn.Module) -> Any:
        """Held-out results of `model` (the same on every process)."""

    def record(self, result: Any) -> dict[str, Any]:
        """The results as a metrics.jsonl record (numbers, lists, strings)."""

    def describe(self, result: Any) -> str:
        """The results in one log line."""

    def time_evaluation(self, model: nn.Module) -> float:
        """Seconds of one evaluation of `model` (for --time-budget; may time a part and scale)."""

    def calibration_inputs(self) -> Iterable[torch.Tensor] | None:
        """Fixed training inputs for the weight average's BatchNorm statistics (None: no BatchNorm)."""


@dataclass
class RunResult:
    steps: int
    final_eval: Any
    examples_per_s: float
    tokens_per_s: float
    net: nn.Module  # the plain model that trained (unwrapped)
    ema_eval: Any = None  # of the weight average, with ema_decay


class Trainer:
    """Runs a Task under a RecipeConfig; see the module doc.

    model: the plain model on its device. meta: what every checkpoint's meta.json
    holds beyond the step (the model's and the run's settings...); expected_meta:
    what a checkpoint must hold to be resumed (e.g. the tokenizer); started: the
    time.monotonic() a --time-budget counts from (default: now).
    """

    def __init__(self, cfg: RecipeConfig, task: Task, model: nn.Module, parallel: ParallelContext,
                 device: torch.device, amp: torch.dtype | None, meta: dict[str, Any],
                 log: Callable[[str], None] = print, expected_meta: dict[str, Any] | None = None,
                 started: float | None = None) -> None:
        self.cfg, self.task, self.parallel, self.device, self.amp = cfg, task, parallel, device, amp
        self.log, self.meta = parallel.log(log), meta
        self.out = Path(cfg.out)
        # metrics.jsonl (and with --tensorboard OUT/tensorboard/) on the main process only
        self.metrics = open_metrics(self.out, cfg.tensorboard) if parallel.is_main else NullMetrics()
        self.started = time.monotonic() if started is None else started  # a --time-budget counts from here
        saved = self._resume_weights(model, expected_meta) if cfg.resume else None  # run_folder checked OUT
        self.deadline: Deadline | None = None
        self.scaler = loss_scaler(amp, device, parallel)  # float16 autocast's loss scale (update.py)
        total = self._total_steps(model, saved)
        if parallel.checks_host_memory(device):
            # gradients, AdamW's two moments (and the EMA): more copies of the weights
            copies = 3 + (1 if cfg.ema_decay else 0)
            check_fits_memory(copies * parameter_bytes(model), "the gradients and optimizer state of training")
        self.ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay else None  # the plain model's copy
        self.model = parallel.wrap(model, device)
        self.net = compiled_if(cfg.compile, self.model, device)  # what the training steps run
        self.optimizer = build_optimizer(cfg.optimizer, parallel.module(self.model), cfg.lr, cfg.weight_decay)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_fraction * total)
        self.schedule = build_schedule(self.optimizer, min(warmup, total), total, cfg.schedule)
        self.progress, self.window = Progress(total=total), LogWindow()
        self._saved_at: int | None = None
        self._stop = StopRequest()  # replaced by the live one while run() runs
        if saved is not None:
            self._resume_state(saved, total)

    # -- the run ----------------------------------------------------------------------
    def run(self) -> RunResult:
        """Train to the end; a first Ctrl-C, SIGTERM or SIGHUP (one process) saves a checkpoint at the
        next step boundary and raises TrainingStopped."""
        with stop_on_signals(not self.parallel.distributed) as self._stop:
            try:
                result = self._run()
            finally:
                self.metrics.close()  # flushes and closes TensorBoard's event file, also after a failure
            if self._stop.signum is not None:  # came after the last save (a finished run's re-evaluation)
                raise self._stopped()
            return result

    def _run(self) -> RunResult:
        task, p = self.task, self.progress
        final = final_ema = None
        bar = _progress_bar(p.total, p.step, self.parallel.is_main)
        mark = time.monotonic()
        compiling = self.cfg.compile  # the first step compiles: out of the budget's step time and the speeds
        while p.step < p.total:
            first = p.step
            self.model.train()
            for batch in task.batches(p.epoch, p.batch):
                self._step(batch, bar, timed=not compiling or (p.total - p.step == 1 and p.step == p.untimed_steps))
                if compiling:
                    compiling, first, mark = False, p.step, time.monotonic()
                if p.step >= p.total:
                    break
                if task.cadence.evaluates_after_step(p.step):
                    final, final_ema = self._evaluate()
                    self.model.train()
                    self._checkpoint()
                elif self.cfg.save_every and p.step % self.cfg.save_every == 0 and p.batch < task.steps_per_epoch:
                    self._checkpoint()  # the epoch's last step is saved after its evaluation, below
                if p.batch < task.steps_per_epoch:  # (the epoch's last step: after its evaluation, below)
                    self._stop_if_asked()
            if p.batch >= task.steps_per_epoch:
                p.epoch += 1
                p.batch = 0
            if self.deadline is not None:
                self._replan(p.step - first, time.monotonic() - mark, bar)
            if p.step >= p.total or task.cadence.evaluates_after_epoch(p.epoch, p.batch == 0):
                mark = time.monotonic()
                final, final_ema = self._evaluate()
                p.eval_seconds = time.monotonic() - mark
                if self.deadline is not None:
                    self.deadline.eval_s = p.eval_seconds
            elif p.batch == 0 and task.cadence.every_epochs:
                self.log(f"epoch {p.epoch}/{self._epochs()} step {p.step} "
                         f"(evaluated every {counted(task.cadence.every_epochs, 'epoch')})")
            mark = time.monotonic()  # the checkpoint counts towards the next epoch's step time
            self._checkpoint()
            self._stop_if_asked()
        bar.close()
        if final is None:  # resumed a finished run: report without training
            final, final_ema = self._evaluate(write=False)
        seconds = p.train_seconds
        return RunResult(p.step, final, p.examples / seconds if seconds else 0.0,
                         p.tokens / seconds if seconds else 0.0, self.parallel.module(self.model), final_ema)

    def _step(self, batch: Any, bar: tqdm, timed: bool = True) -> None:
        p, task = self.progress, self.task
        started = time.perf_counter()
        result = self.update(self.net, self.optimizer, self.schedule, batch, p.step)
        if (bad := result.non_finite()) is not None:  # the values of the weights after p.step updates
            raise TrainingError(f"{bad} at step {p.step + 1}; stopped ({self._kept(p.step)}).")
        if self.ema is not None:
            self.ema.update(self.parallel.module(self.model))
        seconds = time.perf_counter() - started
        p.add(result, seconds, timed)
        self.window.add(result, seconds, timed)
        bar.update(1)
        bar.set_postfix_str(self.window.postfix(task.unit), refresh=False)
        if p.step % self.cfg.log_every == 0 or p.step == p.total:
            done = p.epoch + (p.batch >= task.steps_per_epoch)  # epochs complete, as evaluation lines count them
            self.metrics.write(self.window.record(p, done, self.schedule.get_last_lr()[0], task.unit))
            self.log(self.window.summary(p, task.unit))
            self.window = LogWindow()

    def update(self, net: nn.Module, optimizer, schedule, batch: Any, step: int) -> StepResult:
        """One optimizer update on a global batch: the task's loss, backward, the parallel hooks,
        global-norm clipping, the optimizer and the schedule."""
        loss, result = self.task.loss(net, batch, step)
        apply_update(net, optimizer, loss, self.parallel, self.cfg.clip_norm, schedule, self.scaler)
        return result()

    # -- evaluation and checkpoints ---------------------------------------------------------
    def _calibrate_average(self) -> None:
        """Recompute the weight average's BatchNorm statistics, unless done since its last update."""
        if self.ema is not None and self.ema.calibrated_at != self.ema.updates:
            inputs = self.task.calibration_inputs()
            with autocast(self.device, self.amp):
                self.ema.recalibrate_batch_norm(inputs if inputs is not None else [])

    def _evaluate(self, write: bool = True) -> tuple[Any, Any]:
        """The trained weights' and (with --ema-decay) the averaged weights' results, logged."""
        p, task = self.progress, self.task
        self.parallel.sync_buffers(self.model)
        final = task.evaluate(self.model)
        final_ema = None
        if self.ema is not None:
            self._calibrate_average()
            final_ema = task.evaluate(self.ema.module)
        records = [(split, task.record(r)) for split, r in ((task.split, final), (f"{task.split}_ema", final_ema))
                   if r is not None]
        for _, record in records:
            self._refuse_non_finite(record)
        if write:
            at = dict(step=p.step, epoch=p.epoch)
            for split, record in records:
                self.metrics.write(dict(split=split, **at, **record))
        averaged = f" (EMA weights: {task.describe(final_ema)})" if final_ema is not None else ""
        where = f"epoch {p.epoch}/{self._epochs()} step {p.step}" if task.cadence.every_epochs else f"step {p.step}"
        self.log(f"{where}: {task.describe(final)}{averaged}{drop_note(records[0][1])}")
        return final, final_ema

    def _refuse_non_finite(self, record: dict[str, Any]) -> None:
        """An evaluation (its metrics record) whose loss is NaN or infinite: the last update broke the
        model (the training loss, checked before each update, had not shown it yet). Stop before it is saved."""
        bad = [f"{k} {v}" for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise TrainingError(f"the evaluation at step {self.progress.step} gave {', '.join(bad)}: the model's "
                                f"outputs are no longer finite; stopped ({self._kept(self.progress.step)}).")

    def _kept(self, bad_step: int) -> str:
        """What a stop for a non-finite loss leaves: the checkpoints before the weights of step
        `bad_step`, which gave the loss (a --save-every checkpoint may hold those very weights)."""
        saved = list_checkpoints(self.out)
        if saved and saved[-1].name == checkpoint_dir_name(bad_step):
            before = (f"; {saved[-2]} before it is intact (remove {saved[-1].name} to --resume from it)"
                      if len(saved) > 1 else "")
            return f"the newest checkpoint {saved[-1]} holds the weights that gave it{before}"
        return f"the last good checkpoint {saved[-1]} is intact" if saved else "no checkpoint was saved yet"

    def _checkpoint(self) -> None:
        p, parallel = self.progress, self.parallel
        if self._saved_at == p.step:  # an evaluation at an epoch's last step saved it already
            return
        self._saved_at = p.step
        if self.deadline is not None:
            p.wall_seconds = self.deadline.spent()
        self._calibrate_average()  # so that an evaluation of any checkpoint's average finds fitting statistics
        parallel.sync_buffers(self.model)
        weights = parallel.model_state(self.model)  # collectives (if any) run on every rank
        state = dict(optimizer=parallel.optimizer_state(self.model, self.optimizer),
                     scheduler=self.schedule.state_dict(), rng=capture_rng_state(), progress=vars(p).copy(),
                     window=self.window.state())
        state.update({k: v.state_dict() for k, v in (("ema", self.ema), ("scaler", self.scaler)) if v is not None})
        if parallel.is_main:
            save_checkpoint(self.out, p.step, weights, state, dict(self.meta, epoch=p.epoch, folder=os.path.abspath(self.out)),
                            self.cfg.keep_last)  # (folder: path settings may be compared relative to it)
            drop_set_aside(self.out)  # this run has replaced an earlier one (--overwrite) for good
        parallel.barrier()

    def _stop_if_asked(self) -> None:
        """After a stop signal: save this step's checkpoint (if not saved yet) and raise TrainingStopped;
        but an --overwrite run that saved nothing yet saves nothing: its first save would delete the
        run it replaces, which the run folder puts back instead."""
        if self._stop.signum is not None:
            keeps_earlier = replaces_earlier_run(self.out)
            if not keeps_earlier:
                self._checkpoint()
            raise self._stopped(keeps_earlier)

    def _stopped(self, unsaved: bool = False) -> TrainingStopped:
        p = self.progress
        return self._stop.stopped(p.step, p.total, None if unsaved else find_latest_checkpoint(self.out))

    def _epochs(self) -> int:
        return math.ceil(self.progress.total / self.task.steps_per_epoch)

    # -- resume ---------------------------------------------------------------------------
    def _resume_weights(self, model: nn.Module, expected_meta: dict[str, Any] | None) -> dict | None:
        """Load the latest checkpoint's weights into the (unwrapped) model; its train state, or None."""
        path = find_latest_checkpoint(self.out)
        if path is None:
            self.log(f"--resume: no checkpoint under {self.out}, starting from scratch")
            return None
        expected_meta = {"model": self.cfg.model, **(expected_meta or {})}
        self._refuse_changed_settings(path, read_checkpoint_meta(path))  # before data and weight shape errors
        ckpt = load_checkpoint(path, model, expected_meta=expected_meta)
        self.meta, lacking = unrecorded(self.meta, ckpt.meta, expected_meta)
        if lacking:  # (warnings.warn: a note, once)
            warnings.warn(f"{path} was saved before widenet recorded {', '.join(lacking)}: this resume cannot check "
                          "that it reads the data the run started with, and the run keeps it unrecorded")
        missing = [key for key in TRAIN_STATE_KEYS if key not in ckpt.train_state]
        if missing:
            raise CheckpointError(f"{path / 'state.pt'}: lacks {', '.join(missing)}; it was not written by "
                                  "widenet's trainer, or was damaged")
        self.metrics.truncate_after(ckpt.step)
        return dict(ckpt.train_state, path=str(path), step=ckpt.step)

    def _refuse_changed_settings(self, path: Path, saved_meta: dict[str, Any]) -> None:
        """Raise naming each setting of the run or of the model that differs from the checkpoint's."""
        conflicts, changes = changed_settings(self.cfg, self.meta, saved_meta)
        if changes:
            hint = ""
            if set(conflicts) & _LENGTH_SETTINGS and self.cfg.INIT_CONTINUES:
                hint = (f"; the learning-rate schedule was planned for the run's length, so to train for another "
                        f"length start a new run from this one's weights: --init {self.out} --out NEW_FOLDER "
                        "(without --model)")
            raise SettingsChanged(f"{path}: cannot resume with different settings ({', '.join(changes)}){hint}",
                                  ", ".join(changes))

    def _resume_state(self, saved: dict, total: int) -> None:
        """Optimizer, schedule, RNGs, counters, window and weight average from a checkpoint's train state."""
        try:
            self._load_train_state(saved, total)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"{saved['path']}: its train state does not fit this run "
                                  f"({type(err).__name__}: {first_line(err)})") from err
        self.log(f"resumed from {saved['path']} (step {saved['step']})")

    def _load_train_state(self, saved: dict, total: int) -> None:
        self.parallel.load_optimizer_state(self.model, self.optimizer, saved["optimizer"])
        self.schedule.load_state_dict(saved["scheduler"])
        self.parallel.restore_rng_state(saved["rng"])
        self.progress = Progress.from_state(saved["progress"])
        self.progress.total = total
        self.window = LogWindow.from_state(saved.get("window", {}))
        if self.scaler is not None and "scaler" in saved:  # (a run that was not float16 before starts a scale)
            self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None and "ema" in saved:
            self.ema.load_state_dict(saved["ema"])
        elif self.ema is not None:
            self.log("--ema-decay: the checkpoint holds no weight average; it starts from the resumed weights")
        if self.cfg.time_budget is not None:
            p = self.progress
            self.deadline = Deadline(60.0 * self.cfg.time_budget, self.task.cadence, p.step_seconds(),
                                     p.eval_seconds, self.started, spent_before=p.wall_seconds)

    # -- the run's length and the time budget -------------------------------------------------
    def _total_steps(self, model: nn.Module, saved: dict | None) -> int:
        cfg, task = self.cfg, self.task
        if cfg.time_budget is None:
            return cfg.max_steps or cfg.epochs * task.steps_per_epoch
        if saved is not None:  # the plan as it stood at the checkpoint; the deadline resumes with the state
            return saved["progress"].get("total") or cfg.epochs * task.steps_per_epoch
        plan = self._plan(model)
        self.log(plan.describe(task.steps_per_epoch))
        if plan.steps == 0:
            raise ValueError(f"--time-budget {cfg.time_budget:g} min does not fit one training step and the "
                             f"final evaluation ({plan.describe(task.steps_per_epoch)})")
        self.deadline = Deadline(plan.budget_s, task.cadence, plan.step_s, plan.eval_s, self.started)
        return plan.steps

    def _plan(self, model: nn.Module) -> BudgetPlan:
        """How many steps fit in --time-budget: timed on throwaway copies of the model and optimizer
        (the global RNG states are restored afterwards, so training draws what it would have drawn)."""
        cfg, task = self.cfg, self.task
        if self.parallel.distributed:
            raise ValueError("--time-budget plans a run on one process; under torchrun give --epochs or --max-steps")
        rng, scaler = capture_rng_state(), self.scaler  # the throwaway steps get a scale of their own
        self.scaler, twin = copy.deepcopy(scaler), copy.deepcopy(model).train()
        optimizer = build_optimizer(cfg.optimizer, twin, cfg.lr, cfg.weight_decay)
        schedule = build_schedule(optimizer, 0, 1, "constant")
        ema = ModelEMA(twin, cfg.ema_decay) if cfg.ema_decay else None
        batches = _endless(task)
        steps = itertools.count()

        def step() -> None:
            self.update(twin, optimizer, schedule, next(batches), next(steps))
            if ema is not None:
                ema.update(twin)

        try:
            return plan_budget(cfg.time_budget, lambda: time.monotonic() - self.started, step,
                               lambda: task.time_evaluation(twin) * (2 if ema else 1), task.cadence)
        finally:
            restore_rng_state(rng)
            self.scaler = scaler

    def _replan(self, steps: int, seconds: float, bar: tqdm) -> None:
        """Fit the rest of the run into the time left, with this epoch's `steps` taking `seconds`."""
        p, deadline = self.progress, self.deadline
        deadline.observe_steps(steps, seconds)
        planned = deadline.steps(p.step)
        if planned != p.total:
            self.log(f"time budget: {deadline.budget_s - deadline.spent():.0f} s left, "
                     f"{1000 * deadline.step_s:.1f} ms per step, {deadline.eval_s:.1f} s per evaluation: "
                     f"{p.total} -> {counted(planned, 'step')}")
            p.total = planned
            self.schedule.lr_lambdas[0].total_steps = planned
            bar.total = planned


def _endless(task: Task) -> Iterator[Any]:
    """Training batches in the order of epochs 0, 1, 2, ... without end."""
    for epoch in itertools.count():
        yield from task.batches(epoch, 0)


def _progress_bar(total: int, done: int, show: bool = True) -> tqdm:
    """A live bar (the window's values and speed) on a terminal; silent in logs, in CI and on ranks > 0."""
    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, leave=False,
                disable=not (show and sys.stderr.isatty()))


def seeded_generator(seed: int, step: int) -> torch.Generator:
    """A private generator for (seed, step): draws that must not depend on where a run resumed."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


_LENGTH_SETTINGS = {"max_steps", "epochs", "time_budget"}  # what decides a run's length (and its schedule)


__all__ = ["LogWindow", "Progress", "RunResult", "StepResult", "Task", "Trainer", "TrainingError", "apply_update",
           "seeded_generator"]

