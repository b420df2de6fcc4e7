"""The run folder (``--out``): one run in it at a time, and nothing an earlier run wrote lost by accident.

:func:`claim_run_folder` holds ``OUT/.widenet.lock`` for the whole run (see
:func:`widenet.files.hold_lock`: a second run into the same folder is refused
with the holder's pid; a lock left by a killed run is taken over with a
warning) and decides what the folder may already hold:

- a new run (neither ``--resume`` nor ``--overwrite``): nothing of an earlier
  run (checkpoints, ``metrics.jsonl``, ``tokenizer.json``);
- ``--resume``: a checkpoint to continue from, or no trace of a run at all
  (then it starts from scratch). Files of an attempt that never saved a
  checkpoint are refused rather than overwritten;
- ``--overwrite``: anything; the earlier run's files (only those) are deleted.

Under torchrun the main process claims the folder and every process learns
whether it could.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..distributed.env import all_reduce_sum
from ..distributed.parallel import ParallelContext, on_backend_device
from ..files import LockHeld, hold_lock
from .checkpoint_layout import CHECKPOINTS_DIR, LATEST_FILE, checkpoints_root, find_latest_checkpoint, remove_tree, \
    step_folders

__all__ = ["LOCK_FILE", "RUN_FILES", "RunFolderError", "claim_run_folder", "earlier_run", "resume_or_restart"]

LOCK_FILE = ".widenet.lock"
RUN_FILES = ("metrics.jsonl", "tokenizer.json", "tensorboard")  # beside the checkpoints, what a run writes into OUT


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (another run holds it, or it holds a run already)."""


@contextlib.contextmanager
def claim_run_folder(out: str | Path, resume: bool, overwrite: bool, parallel: ParallelContext,
                     log: Callable[[str], None] = print) -> Iterator[Path]:
    """Lock and check OUT for a run (see the module doc) for the duration of the block."""
    out = Path(out)
    with contextlib.ExitStack() as stack:
        failure: Exception | None = None
        if parallel.is_main:
            try:
                _make_folder(out)
                stack.enter_context(hold_lock(out / LOCK_FILE, warn=lambda line: print(line, file=sys.stderr)))
                _prepare(out, resume, overwrite, log)
            except LockHeld as err:
                failure = RunFolderError(f"{err}; wait for that run to end or choose another --out")
            except (RunFolderError, OSError) as err:
                failure = err
        _agree(parallel, failure, out)
        yield out


def resume_or_restart(out: str | Path) -> dict[str, bool]:
    """The resume/overwrite settings for a driver that owns its run folders (widenet compare):
    continue where a checkpoint exists, else start again over what an unsaved attempt left."""
    resume = find_latest_checkpoint(Path(out)) is not None
    return dict(resume=resume, overwrite=not resume)


def _make_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)


def earlier_run(out: Path) -> list[str]:
    """What of an earlier run OUT holds: its checkpoints and RUN_FILES, as names for a message."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    root = checkpoints_root(out)
    if root == out and (step_folders(out) or (out / LATEST_FILE).exists()):
        found.insert(0, "step_* checkpoint folders")
    elif (out / CHECKPOINTS_DIR).is_dir() and any((out / CHECKPOINTS_DIR).iterdir()):
        found.insert(0, f"{CHECKPOINTS_DIR}/")
    return found


def _prepare(out: Path, resume: bool, overwrite: bool, log: Callable[[str], None]) -> None:
    if resume and overwrite:
        raise RunFolderError("give --resume or --overwrite, not both")
    found = earlier_run(out)
    if overwrite:
        if found:
            _remove_earlier_run(out)
            log(f"--overwrite: deleted the earlier run's {', '.join(found)} in {out}")
        return
    if resume:
        if find_latest_checkpoint(out) is not None or not found:
            return  # a checkpoint to resume, or an empty folder: the trainer says which
        raise RunFolderError(f"{out} holds no complete checkpoint to resume, only {', '.join(found)} of a run "
                             "that never saved one; pass --overwrite to delete them and start again")
    if found:
        raise RunFolderError(f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                             "--overwrite to replace it, or choose another --out")


def _remove_earlier_run(out: Path) -> None:
    root = checkpoints_root(out)
    if root == out:  # the layout before OUT/checkpoints/
        for _, folder in step_folders(out):
            remove_tree(folder)
        (out / LATEST_FILE).unlink(missing_ok=True)
    elif root.is_dir():
        remove_tree(root)
    for name in RUN_FILES:
        remove_tree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)


def _agree(parallel: ParallelContext, failure: Exception | None, out: Path) -> None:
    """Raise on every process when the main one could not claim the folder."""
    if parallel.distributed:
        flag = on_backend_device(torch.tensor([0.0 if failure is None else 1.0]))
        all_reduce_sum(flag)
        if failure is None and flag.item():
            raise RunFolderError(f"the main process could not claim {out} (its message says why)")
    if failure is not None:
        raise failure
