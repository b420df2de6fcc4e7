"""Process-group setup for runs launched with ``torchrun`` (one process per device).

``torchrun --nproc_per_node N -m widenet train ...`` starts N processes and
gives each the environment variables RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. :func:`init_distributed` reads them and joins
the process group (NCCL when CUDA is available, else gloo). Without them, or
with WORLD_SIZE=1, it is a no-op and returns a single-process environment, so
the same code runs unchanged on one process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

__all__ = ["BACKENDS", "DistEnv", "all_reduce_mean", "all_reduce_sum", "barrier", "destroy_distributed",
           "distributed_session", "exit_without_finalizing", "init_distributed", "is_peer_failure",
           "main_process_first"]

BACKENDS = ("auto", "gloo", "nccl")
JOIN_NOTE_AFTER_S = 10.0  # joining the process group takes longer than this: say what it waits for
_log = logging.getLogger("widenet.distributed")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank in [0, world_size), local_rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process (a process group is, or will be, needed)."""
        return self.world_size > 1

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (missing: one process)."""
        environ = os.environ if environ is None else environ
        world = _env_int(environ, "WORLD_SIZE", 1)
        if world < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
        rank = _env_int(environ, "RANK", 0)
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
        return cls(rank=rank, world_size=world, local_rank=_env_int(environ, "LOCAL_RANK", rank))

    @classmethod
    def current(cls) -> DistEnv:
        """The initialised process group's view, else the environment variables' view."""
        if dist.is_available() and dist.is_initialized():
            local = _env_int(os.environ, "LOCAL_RANK", dist.get_rank())
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)
        return cls.from_environ()


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name, "")
    if text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a whole number, got {text!r}") from None


def resolve_backend(backend: str) -> str:
    """'auto' -> nccl when CUDA is available, else gloo."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed backend {backend!r}; use {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("the nccl backend needs CUDA GPUs; use --ddp-backend gloo on CPU")
    return backend


def init_distributed(backend: str = "auto", timeout_s: float | None = None) -> DistEnv:
    """Join the torchrun process group (idempotent); a no-op for one process.

    With NCCL, each process also selects the GPU cuda:LOCAL_RANK.
    timeout_s bounds every collective (None: torch's default), so a rank that
    died turns into an error on the others instead of a hang.
    """
    env = DistEnv.from_environ()
    if not env.distributed:
        return env
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; cannot run on several processes")
    if dist.is_initialized():
        return DistEnv.current()
    name = resolve_backend(backend)
    if name == "nccl":
        torch.cuda.set_device(env.local_rank)
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    waiting = threading.Timer(JOIN_NOTE_AFTER_S, _log.warning, [
        f"process {env.rank} of {env.world_size} is still waiting for the others at {where}; started without "
        "torchrun? then unset WORLD_SIZE and RANK"])
    waiting.daemon = True
    waiting.start()  # a run that joins in time says nothing
    try:
        dist.init_process_group(name, rank=env.rank, world_size=env.world_size, **kwargs)
    finally:
        waiting.cancel()
    return env


def destroy_distributed() -> None:
    """Leave the process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(backend: str = "auto", timeout_s: float | None = None) -> Iterator[DistEnv]:
    """init_distributed() ... destroy_distributed(), also on errors (only if it initialised it)."""
    owned = not (dist.is_available() and dist.is_initialized())
    env = init_distributed(backend, timeout_s)
    try:
        yield env
    finally:
        if owned:
            destroy_distributed()


def exit_without_finalizing(code: int) -> NoReturn:
    """End a process that was in a process group: flush the output, then exit without Python's finalization.

    Why: once DDP has used a gloo group, the group's worker threads outlive
    destroy_process_group(), and the thread that ran the last collective drops
    its work object, and with it references to Python tensors, a moment after
    the caller was told the collective finished. Dropping those references
    takes the GIL. If the interpreter has begun finalizing by then, Python ends
    that thread by unwinding it through a C++ destructor, which calls
    std::terminate: the process aborts (SIGABRT, "terminate called without an active exception")
    after a run that succeeded, and torchrun reports the whole job as failed
    (1 in 50 runs of a 4-step two-process `widenet train` on a 2-core CPU).
    Everything this package writes is closed by the time a command returns, so
    nothing is lost by skipping finalization.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    logging.shutdown()
    os._exit(code)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the ranks of group (None: all), in place; returned for chaining (unchanged on one process)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place (gloo has no AVG: a sum divided by the world size)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. a download into a shared cache), then the others."""
    env = DistEnv.current()
    if not env.is_main:
        barrier()
    try:
        yield
    finally:
        if env.is_main:
            barrier()


_PEER_FAILURE_HINTS = ("gloo", "nccl", "c10d", "connection reset", "connection closed", "timed out", "timeout")


def is_peer_failure(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another rank died, hung or timed out."""
    if dist.is_available() and isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(hint in text for hint in _PEER_FAILURE_HINTS)
