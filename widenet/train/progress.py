"""What a run has done so far: its counters, one update's values and the log window between two lines.

All three are saved in every checkpoint (their dicts), so a resumed run logs
exactly what an uninterrupted one logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LogWindow", "Progress", "StepResult"]


@dataclass
class StepResult:
    """One update's global values (averaged per step in the log window), all checked for finiteness."""

    loss: float
    values: dict[str, float]
    examples: int
    tokens: int = 0

    def non_finite(self) -> str | None:
        """"NAME became VALUE" for the first of the loss and the values that is NaN or infinite, else None.
        An infinite aux loss counts as much as the task's: clipping then scales every gradient to zero."""
        for name, value in (("loss", self.loss), *self.values.items()):
            if not math.isfinite(value):
                hint = " (the MoE's balance and z-losses: see --aux-weight, --z-loss-weight)" if name == "aux_loss" else ""
                return f"{name} became {value}{hint}"
        return None


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches done within `epoch`
    examples: int = 0  # examples, tokens and seconds of the timed steps (see untimed_steps)
    tokens: int = 0
    train_seconds: float = 0.0
    untimed_steps: int = 0  # steps left out of the throughput: each --compile process's compiling step
    total: int = 0  # the run's planned steps (with --time-budget: re-planned after every epoch)
    wall_seconds: float = 0.0  # with --time-budget: seconds of the budget spent at the last checkpoint
    eval_seconds: float = 0.0  # how long the last evaluation took

    @classmethod
    def from_state(cls, state: dict) -> Progress:
        """From a checkpoint's counters (those of earlier versions' image runs named examples `images`)."""
        state = dict(state)
        if "images" in state:
            state["examples"] = state.pop("images")
        return cls(**{k: v for k, v in state.items() if k in cls.__dataclass_fields__})

    def add(self, r: StepResult, seconds: float, timed: bool = True) -> None:
        """One more step; an untimed one (it compiled) counts in untimed_steps, not in the speeds."""
        self.step += 1
        self.batch += 1
        if timed:
            self.examples += r.examples
            self.tokens += r.tokens
            self.train_seconds += seconds
        else:
            self.untimed_steps += 1

    def step_seconds(self) -> float:
        """The mean time of a timed step; with none (a run stopped while it compiled), the budget's
        seconds per step so far."""
        timed = self.step - self.untimed_steps
        return self.train_seconds / timed if timed else self.wall_seconds / max(self.step, 1)


@dataclass
class LogWindow:
    """Running sums between two log lines (saved in checkpoints for exact resume)."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @classmethod
    def from_state(cls, state: dict) -> LogWindow:
        """From a checkpoint's window (earlier image runs kept loss/aux/correct/images sums)."""
        if "sums" in state or not state:
            return cls(**state)
        steps = state.get("steps", 0)
        accuracy = state.get("correct", 0) / max(state.get("images", 0), 1) * steps
        return cls(dict(loss=state.get("loss", 0.0), aux_loss=state.get("aux", 0.0), accuracy=accuracy), steps,
                   state.get("images", 0), 0, state.get("seconds", 0.0))

    def add(self, r: StepResult, seconds: float, timed: bool = True) -> None:
        """One step's values; an untimed step (one that compiled) adds nothing to the speed."""
        for k, v in r.values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        if timed:
            self.examples += r.examples
            self.tokens += r.tokens
            self.seconds += seconds

    def speed(self, unit: str) -> float:
        counted = self.tokens if unit == "tokens" else self.examples
        return counted / self.seconds if self.seconds else 0.0

    def record(self, p: Progress, epoch: int, lr: float, unit: str) -> dict[str, Any]:
        """metrics.jsonl's train line at p.step; epoch: the epochs complete after it."""
        n = max(self.steps, 1)
        speed = {f"{unit}_per_s": self.speed(unit)} if self.seconds else {}  # none for a compiling step alone
        return dict(split="train", step=p.step, epoch=epoch, **{k: v / n for k, v in self.sums.items()},
                    lr=lr, **speed)

    def postfix(self, unit: str) -> str:
        n = max(self.steps, 1)
        values = " ".join(f"{k} {v / n:.4f}" for k, v in self.sums.items())
        return f"{values} {self.speed(unit):.0f} {unit}/s" if self.seconds else values

    def summary(self, p: Progress, unit: str) -> str:
        return f"step {p.step}/{p.total} {self.postfix(unit)}"

    def state(self) -> dict[str, Any]:
        return dict(sums=dict(self.sums), steps=self.steps, examples=self.examples, tokens=self.tokens,
                    seconds=self.seconds)
