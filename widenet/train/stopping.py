"""Stopping a run on request without losing its work: Ctrl-C (SIGINT), SIGTERM (a cluster's
preemption notice, `kill`, `timeout`) or SIGHUP (the terminal closed: a dropped ssh session) while
training asks the Trainer to finish the step at hand, save a checkpoint and stop; `--resume` then
continues exactly where the run stopped. (Output to a terminal that is gone is dropped: cli_errors.)

A second Ctrl-C stops at once (the work since the last checkpoint is lost), as does a second
signal of the other kinds. Under several processes (torchrun) the processes cannot agree on the
step to save at without a collective in every step, so there the signals keep their plain meaning
(Ctrl-C stops, the launcher's SIGTERM is a lost peer: widenet.cli_run).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..signals import STOP_SIGNALS

__all__ = ["StopRequest", "TrainingStopped", "handling", "stop_on_signals"]


class TrainingStopped(RuntimeError):
    """A run stopped on request after saving its checkpoint. where: "at step N of M; saved PATH";
    then: what continues it; status: the process's exit status, 128 + the signal's number, as a shell
    reports a process that signal ended."""

    def __init__(self, signum: int, where: str, complete: bool, then: str = "continue it with --resume") -> None:
        self.signum, self.where, self.complete, self.status = signum, where, complete, 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; "
                         f"{'the run is complete' if complete else then}")

    def advising(self, then: str) -> TrainingStopped:
        """The same stop with other advice, which holds also where this run was complete (a driver of
        several runs, compare, continues its runs itself)."""
        return TrainingStopped(self.signum, self.where, False, then)


class StopRequest:
    """Which stop signal arrived, if any (set by the handlers of stop_on_signals)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def stopped(self, step: int, total: int, saved: Path | None) -> TrainingStopped:
        """The stop at `step` of `total`. saved: the checkpoint the run stopped with; None for an
        --overwrite run stopped before its first, which keeps the run it was replacing (run_folder)."""
        if saved is None:
            return TrainingStopped(self.signum, f"at step {step} of {total}, before this run's first checkpoint: "
                                   "nothing saved, and the run it was replacing is kept", complete=False,
                                   then="run the same command again to start over")
        return TrainingStopped(self.signum, f"at step {step} of {total}; saved {saved}", complete=step >= total)


@contextlib.contextmanager
def stop_on_signals(active: bool = True) -> Iterator[StopRequest]:
    """While inside, the first SIGINT, SIGTERM or SIGHUP only sets request.signum (and says so on
    stderr); a second one gets the handler that was there before (Ctrl-C: KeyboardInterrupt).
    Handlers can only be set in the main thread: elsewhere, or when not active, nothing changes;
    nor for a signal that is ignored (`nohup` ignores SIGHUP)."""
    request, previous = StopRequest(), {}  # previous: filled before the handlers are set

    def first(signum: int, _frame) -> None:
        request.signum = signum
        _put_back(previous)  # the next signal of any of these kinds acts at once
        again = "Ctrl-C again" if signum == signal.SIGINT else "another signal"
        note = (f"widenet: {request.name}: finishing this step (and an evaluation due with it), saving a "
                f"checkpoint, then stopping ({again} stops at once)\n")
        try:  # os.write: the handler may run in the middle of a print to the same stream
            os.write(sys.stderr.fileno(), note.encode(errors="replace"))
        except (OSError, ValueError, AttributeError):  # a stream without a file descriptor (a notebook)
            with contextlib.suppress(Exception):
                print(note, end="", file=sys.stderr, flush=True)

    with handling(STOP_SIGNALS if active else (), first, previous):
        yield request


@contextlib.contextmanager
def handling(signums: tuple[int, ...], handler: Callable[[int, Any], None],
             previous: dict | None = None) -> Iterator[None]:
    """Give each of `signums` `handler` for the block, then put back the handlers it replaced, which
    are recorded in `previous` (signal -> handler) before `handler` can run. Handlers can only be
    set in the main thread: elsewhere nothing changes; nor does a signal ignored from the start
    (`nohup`, a shell's background job and Ctrl-C), which stays ignored."""
    previous = {} if previous is None else previous
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous.update({s: h for s in signums if (h := signal.getsignal(s)) is not signal.SIG_IGN})
    for signum in previous:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        _put_back(previous)


def _put_back(handlers: dict) -> None:
    for signum, handler in handlers.items():  # None: set outside Python, which Python cannot put back
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
