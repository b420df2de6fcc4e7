"""Running a training entry point in one process or in each torchrun process (the CLI's glue)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .cli_errors import CLIError
from .distributed.env import DistEnv, distributed_session, is_peer_failure
from .distributed.parallel import check_global_batch
from .train.trainer import TrainingError

R = TypeVar("R")


class LauncherStop(RuntimeError):
    """SIGTERM in a torchrun process: the launcher stops the survivors after a process failed."""


def refuse_several_processes(command: str) -> None:
    """A driver of several runs (compare, compare-text) runs in one process: under torchrun (or with
    WORLD_SIZE > 1 left set) each process would start every run, and their processes never meet."""
    env = DistEnv.from_environ()
    if env.distributed:
        raise CLIError(f"{command} runs its models one after another in one process; run it without torchrun "
                       f"(WORLD_SIZE={env.world_size} is set)")


def run_on_processes(entry: Callable[[Any], R], cfg: Any, backend: str = "auto",
                     timeout_s: float | None = None) -> R | None:
    """entry(cfg) here, or in every process under torchrun (WORLD_SIZE > 1) after joining the group.

    Returns the result on the main process, None on the others. A lost peer (a
    collective failing because another process died, a timeout, or the
    launcher's SIGTERM) becomes a one-line TrainingError that says the
    checkpoints already written are intact.
    """
    env = DistEnv.from_environ()
    check_global_batch(cfg.batch_size, env.world_size)  # before any process waits for the others
    with distributed_session(backend, timeout_s), _sigterm_raises(env.distributed):
        try:
            result = entry(cfg)
        except RuntimeError as err:
            if not _lost_peer(err, env):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrainingError(f"process {env.rank} lost the other processes ({first[:200]}); stopped. "
                                f"Checkpoints already in {cfg.out} are intact (--resume).") from err
    return result if env.is_main else None


def _lost_peer(err: RuntimeError, env: DistEnv) -> bool:
    """Whether err means another process is gone (not this process's own failure)."""
    if isinstance(err, TrainingError) or not env.distributed:
        return False
    return isinstance(err, LauncherStop) or is_peer_failure(err)


@contextlib.contextmanager
def _sigterm_raises(active: bool) -> Iterator[None]:
    """While active (several processes), SIGTERM raises LauncherStop instead of killing silently."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum, _frame) -> None:
        raise LauncherStop("stopped by the launcher (SIGTERM), most likely because another process failed")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
