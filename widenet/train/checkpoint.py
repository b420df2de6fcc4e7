"""Crash-safe training checkpoints.

On-disk layout under a run folder ``OUT``::

    OUT/checkpoints/
        step_00001000/
            model.safetensors   model weights (safetensors; tied tensors stored once per key)
            state.pt            train state: optimizer, scheduler, RNG, counters
                                (torch.save; loaded with weights_only=True)
            meta.json           model name/config, step, epoch, widenet version, caller meta
        step_00002000/ ...
        latest                  text file naming the newest complete folder ("step_00002000")

A checkpoint is first written to ``.tmp-step_<N>-<pid>/``, every file and the
folder are fsynced, and the folder is renamed into place.  An existing folder
of the same step is swapped atomically with ``renameat2(RENAME_EXCHANGE)``
where the OS supports it; elsewhere the old folder is first moved to
``.tmp-old-step_<N>-<pid>/``, which :func:`find_latest_checkpoint` uses and the
next save moves back if the swap is interrupted.  ``latest`` is then replaced
atomically (temp file, fsync, ``os.replace``, fsync of the folder).  A SIGKILL
at any moment therefore leaves a loadable previous checkpoint; loaders ignore
``.tmp-*`` leftovers and the next save removes them.  Only one process (e.g.
rank 0) should save into a run folder at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import files
from ..files import (RefusedPickle, WeightsDamaged, fsync_path, load_safetensors, load_weights_only,
                     raise_if_disk_full, save_safetensors, write_bytes_durably)
from ..listing import listed
from ..models.hf import nonfinite_tensor
from ..rng import capture_rng_state, restore_rng_state
from .checkpoint_layout import (CHECKPOINT_FILES, CHECKPOINTS_DIR, FORMAT, LATEST_FILE, LOCK_FILE, META_FILE,
                                MODEL_FILE, SET_ASIDE_DIR, STATE_FILE, STEP_RE, TMP_PREFIX, CheckpointError, SettingsChanged,
                                checkpoint_dir_name, checkpoints_root, clean_leftovers, find_latest_checkpoint,
                                is_complete, list_checkpoints, remove_tree, step_folders)

__all__ = ["CheckpointError", "SettingsChanged", "LoadedCheckpoint", "MODEL_FILE", "STATE_FILE", "META_FILE",
           "LATEST_FILE", "capture_rng_state", "check_model_keys", "checkpoint_dir_name", "find_latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "read_checkpoint_meta", "restore_rng_state", "save_checkpoint",
           "train_state_of"]


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path
    step: int
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any] | None  # None: not read (read_train_state=False)


def _widenet_version() -> str:
    """The installed widenet version, or ``"unknown"``."""
    try:
        import widenet

        version = getattr(widenet, "__version__", None)
        if version:
            return str(version)
        from importlib.metadata import version as dist_version

        return dist_version("widenet")
    except Exception:
        return "unknown"


# --------------------------------------------------------------- saving: checks


_LEAF_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _check_loadable(obj: Any, where: str) -> None:
    """Raise TypeError if ``obj`` holds something ``torch.load(weights_only=True)`` refuses."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, nn.Parameter):
            raise TypeError(f"{where}: tensor subclass {type(obj).__name__} is not allowed")
        return
    if type(obj) in _LEAF_TYPES:
        return
    if type(obj) in (list, tuple, torch.Size):
        for i, item in enumerate(obj):
            _check_loadable(item, f"{where}[{i}]")
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool, tuple, type(None))):
                kind = type(key).__name__
                raise TypeError(f"{where}: dict key {key!r} of type {kind} is not allowed")
            _check_loadable(value, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} has type {type(obj).__module__}.{type(obj).__qualname__}, which cannot be "
        "loaded back with weights_only=True; store tensors, numbers, strings, lists, tuples "
        "or dicts (e.g. optimizer.state_dict(), capture_rng_state())"
    )


def _model_tensors(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model state dict as CPU tensors safetensors accepts (contiguous, unshared)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    state = model if isinstance(model, Mapping) else model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model state entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not whole or (ptr in seen and t.numel() > 0):
            t = t.contiguous().clone()
        seen.add(ptr)
        tensors[key] = t
    return tensors


def _build_meta(step: int, meta: Mapping | None, train_state: Mapping) -> dict:
    """meta.json content: caller meta plus step, epoch, version and format."""
    out = dict(meta or {})
    if "step" in out and out["step"] != step:
        raise ValueError(f"meta['step']={out['step']!r} conflicts with step={step}")
    out["step"] = step
    epoch = train_state.get("epoch")
    if "epoch" not in out and isinstance(epoch, int) and not isinstance(epoch, bool):
        out["epoch"] = epoch
    out.setdefault("widenet_version", _widenet_version())
    out["format"] = FORMAT
    return out


# ---------------------------------------------------------------- saving: files
STATE_DIGEST = "state_sha256"  # meta.json's record of state.pt's SHA-256


def _write_folder(tmp: Path, tensors: dict, train_state: Mapping, meta: dict) -> None:
    """Write the three checkpoint files into ``tmp`` and fsync files and folder. meta.json records
    the SHA-256 of state.pt (the optimizer state, the weight average...): model.safetensors carries
    its own checksum, and state.pt damaged in place must not be resumed from or exported."""
    tmp.mkdir()
    save_safetensors(tensors, tmp / MODEL_FILE, metadata={"format": "pt"})
    fsync_path(tmp / MODEL_FILE)
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(dict(train_state), f)
        f.flush()
        os.fsync(f.fileno())
    meta = dict(meta, **{STATE_DIGEST: files.file_sha256(tmp / STATE_FILE)})
    write_bytes_durably(tmp / META_FILE, (json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())
    fsync_path(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``, replacing an existing one safely."""
    root = final.parent
    if not final.exists():
        os.rename(tmp, final)
    elif files.rename_exchange(tmp, final):
        fsync_path(root)
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old checkpoint
    else:  # no atomic swap: briefly only the .tmp-old- copy exists (see find_latest_checkpoint)
        old = root / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(root)


def _write_latest(root: Path, folder_name: str) -> None:
    """Atomically point ``root/latest`` at ``folder_name``."""
    tmp = root / f"{TMP_PREFIX}latest-{os.getpid()}"
    write_bytes_durably(tmp, (folder_name + "\n").encode("utf-8"))
    os.replace(tmp, root / LATEST_FILE)
    fsync_path(root)


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    """Keep ``keep`` plus the ``keep_last - 1`` other complete folders with highest steps."""
    others = [path for _, path in reversed(step_folders(root)) if path != keep]
    kept = 0
    for path in others:
        if kept < keep_last - 1 and is_complete(path):
            kept += 1
        else:
            remove_tree(path)


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module | Mapping[str, torch.Tensor],
    train_state: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    keep_last: int | None = 2,
) -> Path:
    """Atomically save ``OUT/checkpoints/step_<step>/`` and point ``latest`` at it.

    ``train_state`` (optimizer/scheduler state dicts, :func:`capture_rng_state`,
    counters, ...) may contain only tensors, numbers, strings, None, lists,
    tuples and dicts.  ``meta`` (e.g. ``{"model": name, "config": {...},
    "epoch": 3}``) must be JSON-serialisable; ``step``, ``widenet_version`` and
    ``format`` are added.  Afterwards only the ``keep_last`` newest checkpoints
    (by step, always including this one) are kept; ``None`` keeps all.
    ``model`` may also be a ready state dict (e.g. one gathered from the
    shards of a distributed run). Returns the checkpoint folder.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    bad_keep = isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
    if keep_last is not None and bad_keep:
        raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    if not isinstance(train_state, Mapping):
        raise TypeError(f"train_state must be a dict, got {type(train_state).__name__}")
    _check_loadable(dict(train_state), "train_state")
    meta_out = _build_meta(step, meta, train_state)
    try:
        json.dumps(meta_out, sort_keys=True, allow_nan=False)  # before anything is written (as written)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-serialisable: {e}") from e
    tensors = _model_tensors(model)

    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        fsync_path(root.parent)
    clean_leftovers(root)
    final = root / checkpoint_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        _write_folder(tmp, tensors, train_state, meta_out)
        _move_into_place(tmp, final)
    except Exception as err:
        raise_if_disk_full(err, final)  # torch and safetensors word a full disk obscurely
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _write_latest(root, final.name)
    if keep_last is not None:
        _prune(root, final, keep_last)
    return final


# --------------------------------------------------------------------- loading


def _resolve_folder(path: str | os.PathLike) -> Path:
    """Checkpoint folder for a checkpoint folder, run folder, or file inside a checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint path does not exist")
    if p.is_file() and p.name == LATEST_FILE:  # OUT/checkpoints/latest: the checkpoint it names
        p = p.parent
    elif p.is_file():
        if p.name in CHECKPOINT_FILES:
            return p.parent
        raise CheckpointError(f"{p}: not a checkpoint file (expected one of {', '.join(CHECKPOINT_FILES)}, or "
                              f"{LATEST_FILE})")
    if STEP_RE.match(p.name) or any((p / name).exists() for name in CHECKPOINT_FILES):
        return p
    latest = find_latest_checkpoint(p)
    if latest is None:
        root = checkpoints_root(p)
        waiting = ""
        if (p / SET_ASIDE_DIR).is_dir():
            holder = files.live_holder(p / LOCK_FILE)
            waiting = (f"; the run training here ({holder}) has saved none yet, and set the earlier run aside in "
                       f"{p / SET_ASIDE_DIR} until it does" if holder else
                       f"; an earlier run that a killed --overwrite set aside waits in {p / SET_ASIDE_DIR}, and "
                       "the next train, pretrain or finetune into this folder puts it back")
        raise CheckpointError(f"{p}: no complete checkpoint found (looked in {root}){waiting}")
    return latest


def _read_meta(file: Path) -> dict:
    """Parse meta.json or raise CheckpointError."""
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt or unreadable meta.json ({e})") from e
    if not isinstance(meta, dict):
        kind = type(meta).__name__
        raise CheckpointError(f"{file}: corrupt meta.json (expected a JSON object, got {kind})")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{file}: corrupt meta.json ('step' is {step!r}, not an int >= 0)")
    return meta


def read_checkpoint_meta(path: str | os.PathLike, expected_meta: Mapping[str, Any] | None = None) -> dict:
    """A checkpoint's meta.json (path: a checkpoint folder or a run folder, as for load_checkpoint),
    checked against expected_meta as load_checkpoint does, without reading the weights: what a
    resume compares before loading them."""
    file = _resolve_folder(path) / META_FILE
    meta = _read_meta(file)
    if expected_meta:
        _check_expected_meta(file, meta, expected_meta)
    return meta


def _check_expected_meta(file: Path, meta: dict, expected: Mapping, within: str = "") -> None:
    """Raise CheckpointError if any ``expected`` entry differs from ``meta`` (a dict entry: only the
    keys it names, e.g. ``{"data": {"classes": [...]}}``; such a record, or a key inside one, that
    the checkpoint does not hold, as one written before widenet recorded it, is not compared)."""
    for key, want in expected.items():
        have = meta.get(key, "<missing>")
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            _check_expected_meta(file, have, want, f"{within}{key}.")
            continue
        if have == want or (key not in meta and (within or isinstance(want, Mapping))):
            continue
        if within:  # a record: the data, the tokenizer
            record = within.rstrip(".")
            raise CheckpointError(f"{file}: this run's {record} differs from the checkpoint's ({key} {want!r} here, "
                                  f"{have!r} in the checkpoint); a resumed run keeps the {record} it started with: "
                                  "put it back, or start a new run (another --out, or --overwrite)")
        if key == "model":
            raise CheckpointError(
                f"{file}: checkpoint is for model {have!r} but model {want!r} was requested"
            )
        raise CheckpointError(
            f"{file}: meta {key!r} is {have!r} in the checkpoint, expected {want!r}"
        )


def _read_model_state(file: Path) -> dict[str, torch.Tensor]:
    """Load model.safetensors or raise CheckpointError."""
    try:
        return load_safetensors(file)
    except WeightsDamaged as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # safetensors raises SafetensorError, OSError, ...
        raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from e


def _read_train_state(file: Path, digest: str | None = None) -> dict:
    """Load state.pt with ``weights_only=True`` or raise CheckpointError; digest: its SHA-256 as
    meta.json records it (checkpoints saved before that was recorded load unchecked)."""
    try:
        state = load_weights_only(file)
    except RefusedPickle as e:
        raise CheckpointError(f"{e} (a state.pt holds only tensors, numbers, strings, lists and dicts)") from None
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: corrupt or unreadable state.pt ({first_line})") from e
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise CheckpointError(f"{file}: corrupt state.pt (expected a dict, got {kind})")
    if digest is not None and files.file_sha256(file) != digest:  # it loads, but not as it was saved
        raise CheckpointError(f"{file}: the train state does not match the checksum saved with it in "
                              f"{META_FILE}: a failing disk or an incomplete copy")
    return state


def train_state_of(folder: Path, meta: Mapping[str, Any]) -> dict:
    """A checkpoint folder's state.pt, checked against the digest `meta` (its meta.json, as read with
    its weights) records; a folder removed or replaced since (a run training there keeps only its
    last checkpoints; --overwrite) is named as such, not as a damaged file."""
    try:
        return _read_train_state(folder / STATE_FILE, meta.get(STATE_DIGEST))
    except CheckpointError:
        try:
            unchanged = _read_meta(folder / META_FILE) == meta
        except CheckpointError:
            unchanged = False
        if unchanged:
            raise
        raise CheckpointError(f"{folder}: removed or replaced since its weights were read (a run training there "
                              "keeps only its last checkpoints); run the command again") from None


def check_model_keys(file: Path, meta: dict, state: Mapping, model: nn.Module) -> None:
    """Raise CheckpointError listing missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {listed(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch ({len(mismatched)}): {listed(mismatched)}")
    if problems:
        saved_for = f" (checkpoint model {meta['model']!r})" if "model" in meta else ""
        raise CheckpointError(
            f"{file}: weights do not match {type(model).__name__}{saved_for}: "
            + "; ".join(problems)
        )


def check_finite(state: dict[str, torch.Tensor], where: Any) -> None:
    """CheckpointError naming the first floating tensor that holds NaN or infinity."""
    if (bad := nonfinite_tensor(state)) is not None:
        raise CheckpointError(f"{where}: weight {bad} holds NaN or infinite values")


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    expected_meta: Mapping[str, Any] | None = None,
    read_train_state: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint and, if ``model`` is given, its weights (strict keys).

    ``path`` may be a checkpoint folder, a run folder (its latest checkpoint is
    used) or ``model.safetensors`` itself.  Every file is read and checked
    before ``model`` is touched.  Raises :class:`CheckpointError` naming the file
    for missing/corrupt files, refused (non weights-only) state, a meta entry
    differing from ``expected_meta``, or weights not matching ``model`` or, when
    loaded into it, not finite. ``read_train_state=False`` leaves state.pt unread (train_state None;
    train_state_of reads it): what uses only the weights is not held up by the optimizer's state.
    """
    folder = _resolve_folder(path)
    for name in CHECKPOINT_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing checkpoint file")
    meta = _read_meta(folder / META_FILE)
    if expected_meta:
        _check_expected_meta(folder / META_FILE, meta, expected_meta)
    model_state = _read_model_state(folder / MODEL_FILE)
    train_state = train_state_of(folder, meta) if read_train_state else None
    if model is not None:
        check_model_keys(folder / MODEL_FILE, meta, model_state, model)
        check_finite(model_state, folder / MODEL_FILE)  # a damaged file would train to a NaN loss
        try:
            model.load_state_dict(model_state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{folder / MODEL_FILE}: could not load weights ({e})") from e
    return LoadedCheckpoint(folder, meta["step"], meta, model_state, train_state)
