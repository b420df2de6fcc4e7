"""The run folder (``--out``): one run in it at a time, and nothing an earlier run wrote lost by accident.

:func:`claim_run_folder` holds ``OUT/.widenet.lock`` for the whole run (see
:func:`widenet.files.hold_lock`: a second run into the same folder is refused
with the holder's pid; a lock left by a killed run is taken over with a
warning) and decides what the folder may already hold:

- never a folder holding a saved model (``config.json``: an export, an
  import, a Hugging Face folder), whose model would shadow the run's;
- a new run (neither ``--resume`` nor ``--overwrite``): nothing of an earlier
  run (checkpoints, ``metrics.jsonl``, ``tokenizer.json``). A run that ends
  having written only ``tokenizer.json`` (a text run stopped or failed before
  it logged a step) removes it, so that it does not count as a run;
- ``--resume``: a checkpoint to continue from, or no trace of a run at all
  (then it starts from scratch). Files of an attempt that never saved a
  checkpoint are refused rather than overwritten;
- ``--overwrite``: anything; the earlier run's files (only those) are set
  aside in ``OUT/.widenet-overwritten/`` and deleted once the new run has
  saved a checkpoint or ended well. A run that fails before either (a setting
  the data refuses, a crash at the first step, Ctrl-C) puts them back, and so
  does the next run into OUT after one that was killed: --overwrite never
  loses a run to a replacement that did not get going.

Under torchrun the main process claims the folder and every process learns
whether it could.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..distributed.env import all_reduce_sum
from ..distributed.parallel import ParallelContext, on_backend_device
from ..files import LockHeld, hold_lock, no_folder_at, refuse_non_folder
from ..signals import signals_held
from .checkpoint_layout import (CHECKPOINT_FILES, CHECKPOINTS_DIR, LATEST_FILE, LOCK_FILE, SET_ASIDE_DIR,
                                SettingsChanged, checkpoints_root, find_latest_checkpoint, remove_tree, step_folders)
from .exported import CONFIG_FILE, TOKENIZER_FILE  # CONFIG_FILE marks a saved model's folder (an export, HF)
from .stopping import TrainingStopped

__all__ = ["LOCK_FILE", "RUN_FILES", "SET_ASIDE_DIR", "RunFolderError", "claim_run_folder", "drop_set_aside",
           "driver_run", "earlier_run", "replaces_earlier_run", "resume_or_restart"]

RUN_FILES = ("metrics.jsonl", TOKENIZER_FILE, "tensorboard")  # beside the checkpoints, what a run writes into OUT


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (another run holds it, or it holds a run already)."""


@contextlib.contextmanager
def claim_run_folder(out: str | Path, resume: bool, overwrite: bool, parallel: ParallelContext,
                     log: Callable[[str], None] = print) -> Iterator[Path]:
    """Lock and check OUT for a run (see the module doc) for the duration of the block."""
    out = Path(out)
    with contextlib.ExitStack() as stack:
        failure: Exception | None = None
        held = False  # the lock: only then is what OUT holds this call's to settle
        fresh = False  # OUT held no run once prepared: what the block writes is all this run's
        try:
            if parallel.is_main:
                try:
                    _make_folder(out)
                    stack.enter_context(hold_lock(out / LOCK_FILE, warn=lambda line: print(line, file=sys.stderr)))
                    held = True
                    _settle_set_aside(out, log, after_kill=True)
                    _prepare(out, resume, overwrite, log)
                    fresh = not earlier_run(out)
                except LockHeld as err:
                    failure = RunFolderError(f"{err}; wait for that run to end or choose another --out")
                except (RunFolderError, OSError) as err:
                    failure = err
            _agree(parallel, failure, out)
            yield out
        except BaseException:  # (also a signal before the run began: the earlier run is put back at once)
            if held:  # (OSError: the run's own failure is the one to report)
                if fresh and earlier_run(out) == [TOKENIZER_FILE]:  # kept, it would make the next run need
                    with contextlib.suppress(OSError):  # --overwrite (which trains it again anyway)
                        (out / TOKENIZER_FILE).unlink()
                with contextlib.suppress(OSError):
                    _settle_set_aside(out, log)
            raise
        if parallel.is_main:
            drop_set_aside(out)


def resume_or_restart(out: str | Path) -> dict[str, bool]:
    """The resume/overwrite settings for a driver that owns its run folders (widenet compare):
    continue where a checkpoint exists, else start again over what an unsaved attempt left."""
    resume = find_latest_checkpoint(Path(out)) is not None
    return dict(resume=resume, overwrite=not resume)


@contextlib.contextmanager
def driver_run(out: str | Path) -> Iterator[None]:
    """Around one run of a driver that owns its run folders (widenet compare): a run there made by an
    earlier call with other settings is named as such; the trainer's advice (--resume, --init) is
    for commands the user gives, not for the driver's."""
    try:
        yield
    except SettingsChanged as err:
        raise SettingsChanged(f"{out} was made by an earlier call with other settings ({err.changes}); repeat "
                              "that call to continue it, or give this one another --out", err.changes) from None
    except TrainingStopped as err:  # a stop signal, after the run saved its checkpoint
        raise err.advising("run the same command again to continue") from None


def _make_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunFolderError(no_folder_at(out, "--out"))
    refuse_non_folder(out, "--out")  # a file where a folder above it would be (NotADirectoryError, as mkdir raises)
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
    if (out / CONFIG_FILE).exists():  # eval, predict and export would read that model, not this run
        raise RunFolderError(f"{out} holds a saved model ({CONFIG_FILE}: an export, an import or a Hugging Face "
                             "folder), which eval, predict and export would go on reading instead of the run; "
                             "choose another --out")
    found = earlier_run(out)
    if overwrite:
        if found:
            _set_aside(out)
            log(f"--overwrite: set aside the earlier run's {', '.join(found)} in {out} (deleted once this run "
                "saves a checkpoint; put back if it fails before)")
        return
    if resume:
        if find_latest_checkpoint(out) is not None or not found:
            return  # a checkpoint to resume, or an empty folder: the trainer says which
        damaged = _incomplete_checkpoints(out)
        if damaged:  # saved, then damaged: the weights may still be there; deleting them is not the advice
            raise RunFolderError(f"{out} holds no complete checkpoint to resume: {'; '.join(damaged)}; put the "
                                 "missing files back, or choose another --out (--overwrite would delete them)")
        raise RunFolderError(f"{out} holds no complete checkpoint to resume, only {', '.join(found)} of a run "
                             "that never saved one; pass --overwrite to delete them and start again")
    if found and find_latest_checkpoint(out) is None and not _incomplete_checkpoints(out):
        raise RunFolderError(f"{out} already holds a run that never saved a checkpoint ({', '.join(found)}): "
                             "nothing to resume; pass --overwrite to replace it, or choose another --out")
    if found:
        raise RunFolderError(f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                             "--overwrite to replace it, or choose another --out")


def _incomplete_checkpoints(out: Path) -> list[str]:
    """Each step_* checkpoint folder of OUT that lacks files, with what it lacks."""
    return [f"{folder} lacks {', '.join(missing)}" for _, folder in step_folders(checkpoints_root(out))
            if (missing := [name for name in CHECKPOINT_FILES if not (folder / name).is_file()])]


def _run_paths(out: Path) -> list[Path]:
    """The files and folders of the run in OUT: its checkpoints (either layout) and RUN_FILES."""
    root = checkpoints_root(out)
    if root == out:  # the layout before OUT/checkpoints/
        paths = [folder for _, folder in step_folders(out)] + [out / LATEST_FILE]
    else:
        paths = [root]
    return [path for path in paths + [out / name for name in RUN_FILES] if path.exists()]


def _set_aside(out: Path) -> None:
    """Move the earlier run's files into OUT/SET_ASIDE_DIR (renames within OUT: nothing is copied);
    when one cannot be moved, those already moved go back before the error is raised."""
    aside = out / SET_ASIDE_DIR
    aside.mkdir()
    moved: list[Path] = []
    with signals_held():  # a run half set aside would be taken for two runs' files
        try:
            for path in _run_paths(out):
                os.replace(path, aside / path.name)
                moved.append(path)
        except OSError:
            for path in moved:
                os.replace(aside / path.name, path)
            aside.rmdir()
            raise


def _settle_set_aside(out: Path, log: Callable[[str], None], after_kill: bool = False) -> None:
    """What an --overwrite run set aside, after that run stopped (`after_kill`: found by the next
    run): deleted if the run saved a checkpoint (it replaced the earlier run), else put back in
    place of what the run wrote."""
    aside = out / SET_ASIDE_DIR
    if not aside.is_dir():
        return
    if find_latest_checkpoint(out) is not None:
        drop_set_aside(out)
        return
    with signals_held():  # half put back, the earlier run's files would be taken for this run's
        for path in _run_paths(out):
            _remove(path)
        for path in aside.iterdir():
            os.replace(path, out / path.name)
        aside.rmdir()
    if after_kill:
        log(f"an earlier --overwrite run into {out} ended (killed?) before saving a checkpoint; put back the run "
            "it was replacing")
    else:
        log(f"--overwrite: the run stopped before saving a checkpoint; put the earlier run back in {out}")


def replaces_earlier_run(out: Path) -> bool:
    """Whether this --overwrite run has set an earlier run aside and saved nothing yet (which puts
    that run back if the run stops now)."""
    return (out / SET_ASIDE_DIR).is_dir()


def drop_set_aside(out: Path) -> None:
    """Delete what an --overwrite run set aside: called once the run saved a checkpoint (Trainer)."""
    if (out / SET_ASIDE_DIR).is_dir():
        remove_tree(out / SET_ASIDE_DIR)


def _remove(path: Path) -> None:
    remove_tree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _agree(parallel: ParallelContext, failure: Exception | None, out: Path) -> None:
    """Raise on every process when the main one could not claim the folder."""
    if parallel.distributed:
        flag = on_backend_device(torch.tensor([0.0 if failure is None else 1.0]))
        all_reduce_sum(flag)
        if failure is None and flag.item():
            raise RunFolderError(f"the main process could not claim {out} (its message says why)")
    if failure is not None:
        raise failure
