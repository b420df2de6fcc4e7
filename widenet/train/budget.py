"""Training for a wall-clock budget (`widenet train --time-budget MINUTES`).

Before the first update the run is planned from costs measured on this
machine (by widenet.train.trainer, for any task):

    steps = the largest S with  S * step_s + evaluations(S) * eval_s <= seconds left

where step_s is one training step timed on a throwaway copy of the model
and optimizer, and eval_s one test-set evaluation, timed on a slice of the
test set and scaled. The learning-rate schedule is built for S steps. After
every epoch the plan is redone for the time then left, with the mean step
time of the epochs so far (checkpoint writes and logging included) and the
last evaluation's time; the schedule's end moves with it. Checkpoints store the
current plan and the seconds spent, so `--resume` goes on with both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..listing import counted


@dataclass(frozen=True)
class BudgetPlan:
    """What a time budget bought: `steps` training steps (0: not even one fits)."""

    budget_s: float
    spent_s: float  # before planning: data loading, model building and the measurements themselves
    step_s: float
    eval_s: float  # one evaluation on the whole test set (both weight sets with a weight average)
    steps: int

    def describe(self, per_epoch: int) -> str:
        return (f"time budget {self.budget_s / 60:g} min: {self.spent_s:.1f} s spent before training, "
                f"{1000 * self.step_s:.1f} ms per step and {self.eval_s:.1f} s per evaluation (measured) "
                f"-> {counted(self.steps, 'step')} ({self.steps / per_epoch:.2f} epochs)")


def evaluations_in(steps: int, per_epoch: int, eval_every: int) -> int:
    """Test-set evaluations a run of `steps` makes: after every `eval_every`-th finished epoch,
    and always after the last step (once, if that is also such an epoch's end)."""
    epochs_done, partial = divmod(steps, per_epoch)
    return epochs_done // eval_every + (1 if partial or epochs_done % eval_every else 0)


@dataclass(frozen=True)
class Cadence:
    """When a run evaluates: after every `every_epochs`-th finished epoch, or after every
    `every_steps`-th step, and always after its last step (None, None: only then)."""

    per_epoch: int
    every_epochs: int | None = None
    every_steps: int | None = None

    def evaluates_after_step(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0

    def evaluates_after_epoch(self, epoch: int, finished: bool) -> bool:
        return bool(self.every_epochs) and finished and epoch % self.every_epochs == 0

    def evaluations(self, steps: int) -> int:
        """Evaluations a run of `steps` steps makes, the final one included."""
        if self.every_epochs:
            return evaluations_in(steps, self.per_epoch, self.every_epochs)
        if self.every_steps:
            return (steps - 1) // self.every_steps + 1 if steps else 1
        return 1

    def evaluated(self, done: int) -> int:
        """Evaluations behind a run at step `done` (not counting a final one)."""
        if self.every_epochs:
            return (done // self.per_epoch) // self.every_epochs
        if self.every_steps:
            return done // self.every_steps
        return 0


def steps_within(seconds: float, step_s: float, eval_s: float, cadence: Cadence, done: int = 0,
                 most: int = 10**9) -> int:
    """The largest total step count (at most `most`) such that the steps after `done` and their
    evaluations fit in `seconds`; `done` itself if none fits. `done` steps are behind, with their
    evaluations (not a final one)."""
    if step_s <= 0 or eval_s < 0:
        raise ValueError(f"step time must be > 0 and evaluation time >= 0, got {step_s}, {eval_s}")
    evaluated = cadence.evaluated(done)

    def cost(steps: int) -> float:
        return (steps - done) * step_s + (cadence.evaluations(steps) - evaluated) * eval_s

    low, high = done, max(done, most)  # cost(low) fits (or low == done): find the last fitting count
    while low < high:
        mid = (low + high + 1) // 2
        if cost(mid) <= seconds:
            low = mid
        else:
            high = mid - 1
    return low


@dataclass
class Deadline:
    """A budgeted run's clock. After each epoch the loop reports the steps it timed (`observe_steps`)
    and asks `steps()` again, so a machine that slows down or speeds up still ends the run near the
    deadline (the learning-rate schedule stretches or shrinks with it). The step time is the mean
    over every step observed so far: epoch-to-epoch noise (~5-10% on a shared CPU) would otherwise
    move the schedule's end back and forth, while the error of the mean shrinks with the steps left."""

    budget_s: float
    cadence: Cadence
    step_s: float  # until steps are observed: the planning's estimate
    eval_s: float
    started: float  # clock() when this process began the run
    spent_before: float = 0.0  # seconds of the attempts before a resume
    clock: Callable[[], float] = time.monotonic
    observed_steps: int = 0
    observed_s: float = 0.0

    def spent(self) -> float:
        return self.spent_before + self.clock() - self.started

    def observe_steps(self, steps: int, seconds: float) -> None:
        if steps > 0:
            self.observed_steps += steps
            self.observed_s += seconds
            self.step_s = self.observed_s / self.observed_steps

    def steps(self, done: int) -> int:
        """The run's total: `done` plus the steps (and evaluations) that fit in the time left."""
        return steps_within(self.budget_s - self.spent(), self.step_s, self.eval_s, self.cadence, done=done)


def time_per_call(call: Callable[[], object], warmup: int, min_calls: int, min_seconds: float) -> float:
    """Mean seconds of `call` over at least `min_calls` calls and `min_seconds`, after `warmup` untimed calls.
    `call` must wait for its own results (a GPU step that returns Python numbers does)."""
    for _ in range(warmup):
        call()
    calls, started = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - started < min_seconds:
        call()
        calls += 1
    return (time.perf_counter() - started) / calls


def plan_budget(minutes: float, spent_s: Callable[[], float], step: Callable[[], object],
                evaluation_s: Callable[[], float], cadence: Cadence) -> BudgetPlan:
    """Measure a step and an evaluation, then fit the steps into what is left of `minutes`.

    spent_s(): seconds used so far (read after measuring); step(): one throwaway training step;
    evaluation_s(): the measured seconds of one evaluation (of both weight sets with a weight average)."""
    budget_s = 60.0 * minutes
    step_s = time_per_call(step, warmup=2, min_calls=5, min_seconds=min(30.0, 0.01 * budget_s))
    eval_s = evaluation_s()
    spent = spent_s()
    steps = steps_within(budget_s - spent, step_s, eval_s, cadence)
    return BudgetPlan(budget_s, spent, step_s, eval_s, steps)
