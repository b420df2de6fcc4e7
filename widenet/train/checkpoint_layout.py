"""The on-disk layout of a run's checkpoints: names, listing, the newest complete one, leftovers.

    OUT/checkpoints/step_00001000/{model.safetensors, state.pt, meta.json}
    OUT/checkpoints/latest          the newest complete folder's name

See widenet.train.checkpoint for how a save stays crash-safe.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..files import fsync_path, pid_alive

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
CHECKPOINTS_DIR = "checkpoints"
FORMAT = "widenet-checkpoint-v1"
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, META_FILE)
TMP_PREFIX = ".tmp-"
STEP_RE = re.compile(r"^step_(\d{8,})$")
_DISPLACED_RE = re.compile(r"^\.tmp-old-(step_\d{8,})-\d+$")
SET_ASIDE_DIR = ".widenet-overwritten"  # an --overwrite run's predecessor until the new run has a checkpoint
LOCK_FILE = ".widenet.lock"  # held by the run training in the folder (run_folder.claim_run_folder)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the requested model."""


class SettingsChanged(CheckpointError):
    """A run resumed with other settings than its checkpoint was made with; `changes` names them."""

    def __init__(self, message: str, changes: str) -> None:
        super().__init__(message)
        self.changes = changes


def checkpoint_dir_name(step: int) -> str:
    """Folder name of the checkpoint for ``step``: ``step_`` + 8-digit zero-padded step."""
    return f"step_{step:08d}"


def remove_tree(path: Path) -> None:
    """Delete a checkpoint folder: rename it to a ``.tmp-`` name first, then delete it."""
    doomed = path.parent / f"{TMP_PREFIX}del-{path.name}-{os.getpid()}"
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    if doomed.is_symlink():  # the link goes, not what it points to (rmtree refuses links)
        doomed.unlink()
    else:
        shutil.rmtree(doomed, ignore_errors=True)


def clean_leftovers(root: Path) -> None:
    """Remove ``.tmp-*`` entries left by crashed saves (skips those of live processes)."""
    for entry in root.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        pid = entry.name.rsplit("-", 1)[-1]
        if pid.isdigit() and pid_alive(int(pid)):
            continue
        if _restore_displaced(root, entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _restore_displaced(root: Path, entry: Path) -> bool:
    """Move an old checkpoint set aside by an interrupted replace back, if its slot is empty."""
    match = _DISPLACED_RE.match(entry.name)
    if not match or not is_complete(entry) or (root / match.group(1)).exists():
        return False
    os.rename(entry, root / match.group(1))
    fsync_path(root)
    return True


def is_complete(folder: Path) -> bool:
    """A checkpoint folder with all three files present."""
    return folder.is_dir() and all((folder / name).is_file() for name in CHECKPOINT_FILES)


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*`` folder in ``root``, ascending by step."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def checkpoints_root(out_dir: str | os.PathLike) -> Path:
    """``OUT/checkpoints``; also accepts the ``checkpoints`` folder itself."""
    out = Path(out_dir)
    if (out / CHECKPOINTS_DIR).is_dir():
        return out / CHECKPOINTS_DIR
    if (out / LATEST_FILE).is_file() or step_folders(out):
        return out
    return out / CHECKPOINTS_DIR


def _read_latest(root: Path) -> Path | None:
    """The folder named by ``root/latest``, or None if missing/unreadable/invalid."""
    try:
        name = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if STEP_RE.match(name) else None


def _displaced_copy(root: Path, name: str) -> Path | None:
    """Complete ``.tmp-old-<name>-<pid>`` folder left by an interrupted replace, if any."""
    for entry in sorted(root.glob(f"{TMP_PREFIX}old-{name}-*")):
        if _DISPLACED_RE.match(entry.name) and is_complete(entry):
            return entry
    return None


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, ascending by step."""
    root = checkpoints_root(out_dir)
    return [path for _, path in step_folders(root) if is_complete(path)]


def find_latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of run ``out_dir``, or None.

    Uses ``OUT/checkpoints/latest`` when it names a complete folder; otherwise
    falls back to the complete ``step_*`` folder with the highest step.
    ``.tmp-*`` leftovers are ignored, except the old copy of the folder
    ``latest`` names when a non-atomic replace of it was interrupted (only on
    filesystems without ``RENAME_EXCHANGE``); the next save moves it back.
    """
    root = checkpoints_root(out_dir)
    named = _read_latest(root)
    if named is not None and is_complete(named):
        return named
    if named is not None and not named.exists():
        displaced = _displaced_copy(root, named.name)
        if displaced is not None:
            return displaced
    complete = list_checkpoints(root)
    return complete[-1] if complete else None
