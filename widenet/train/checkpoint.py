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

import ctypes
import errno
import json
import os
import random
import re
import shutil
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "MODEL_FILE",
    "STATE_FILE",
    "META_FILE",
    "LATEST_FILE",
    "capture_rng_state",
    "checkpoint_dir_name",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
CHECKPOINTS_DIR = "checkpoints"
FORMAT = "widenet-checkpoint-v1"
_FILES = (MODEL_FILE, STATE_FILE, META_FILE)
_TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_DISPLACED_RE = re.compile(r"^\.tmp-old-(step_\d{8,})-\d+$")
_MAX_LISTED = 5


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the requested model."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path
    step: int
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]


# ---------------------------------------------------------------- small helpers


def checkpoint_dir_name(step: int) -> str:
    """Folder name of the checkpoint for ``step``: ``step_`` + 8-digit zero-padded step."""
    return f"step_{step:08d}"


def _fsync_path(path: Path) -> None:
    """fsync a file or (on POSIX) a directory."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (so its temp folder may still be in use)."""
    if pid == os.getpid():
        return False  # our own leftovers: saving is not re-entrant
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap ``a`` and ``b`` (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    c_int, c_path = ctypes.c_int, ctypes.c_char_p
    renameat2.argtypes = [c_int, c_path, c_int, c_path, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove_tree(path: Path) -> None:
    """Delete a checkpoint folder: rename it to a ``.tmp-`` name first, then delete it."""
    doomed = path.parent / f"{_TMP_PREFIX}del-{path.name}-{os.getpid()}"
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _clean_leftovers(root: Path) -> None:
    """Remove ``.tmp-*`` entries left by crashed saves (skips those of live processes)."""
    for entry in root.iterdir():
        if not entry.name.startswith(_TMP_PREFIX):
            continue
        pid = entry.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)):
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
    if not match or not _is_complete(entry) or (root / match.group(1)).exists():
        return False
    os.rename(entry, root / match.group(1))
    _fsync_path(root)
    return True


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


# ------------------------------------------------------------- layout: finding


def _is_complete(folder: Path) -> bool:
    """A checkpoint folder with all three files present."""
    return folder.is_dir() and all((folder / name).is_file() for name in _FILES)


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*`` folder in ``root``, ascending by step."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _checkpoints_root(out_dir: str | os.PathLike) -> Path:
    """``OUT/checkpoints``; also accepts the ``checkpoints`` folder itself."""
    out = Path(out_dir)
    if (out / CHECKPOINTS_DIR).is_dir():
        return out / CHECKPOINTS_DIR
    if (out / LATEST_FILE).is_file() or _step_folders(out):
        return out
    return out / CHECKPOINTS_DIR


def _read_latest(root: Path) -> Path | None:
    """The folder named by ``root/latest``, or None if missing/unreadable/invalid."""
    try:
        name = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if _STEP_RE.match(name) else None


def _displaced_copy(root: Path, name: str) -> Path | None:
    """Complete ``.tmp-old-<name>-<pid>`` folder left by an interrupted replace, if any."""
    for entry in sorted(root.glob(f"{_TMP_PREFIX}old-{name}-*")):
        if _DISPLACED_RE.match(entry.name) and _is_complete(entry):
            return entry
    return None


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, ascending by step."""
    root = _checkpoints_root(out_dir)
    return [path for _, path in _step_folders(root) if _is_complete(path)]


def find_latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of run ``out_dir``, or None.

    Uses ``OUT/checkpoints/latest`` when it names a complete folder; otherwise
    falls back to the complete ``step_*`` folder with the highest step.
    ``.tmp-*`` leftovers are ignored, except the old copy of the folder
    ``latest`` names when a non-atomic replace of it was interrupted (only on
    filesystems without ``RENAME_EXCHANGE``); the next save moves it back.
    """
    root = _checkpoints_root(out_dir)
    named = _read_latest(root)
    if named is not None and _is_complete(named):
        return named
    if named is not None and not named.exists():
        displaced = _displaced_copy(root, named.name)
        if displaced is not None:
            return displaced
    complete = list_checkpoints(root)
    return complete[-1] if complete else None


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


def _write_bytes_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_folder(tmp: Path, tensors: dict, train_state: Mapping, meta_text: str) -> None:
    """Write the three checkpoint files into ``tmp`` and fsync files and folder."""
    from safetensors.torch import save_file

    tmp.mkdir()
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    _fsync_path(tmp / MODEL_FILE)
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(dict(train_state), f)
        f.flush()
        os.fsync(f.fileno())
    _write_bytes_durably(tmp / META_FILE, meta_text.encode("utf-8"))
    _fsync_path(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``, replacing an existing one safely."""
    root = final.parent
    if not final.exists():
        os.rename(tmp, final)
    elif _rename_exchange(tmp, final):
        _fsync_path(root)
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old checkpoint
    else:  # no atomic swap: briefly only the .tmp-old- copy exists (see find_latest_checkpoint)
        old = root / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        _fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(root)


def _write_latest(root: Path, folder_name: str) -> None:
    """Atomically point ``root/latest`` at ``folder_name``."""
    tmp = root / f"{_TMP_PREFIX}latest-{os.getpid()}"
    _write_bytes_durably(tmp, (folder_name + "\n").encode("utf-8"))
    os.replace(tmp, root / LATEST_FILE)
    _fsync_path(root)


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    """Keep ``keep`` plus the ``keep_last - 1`` other complete folders with highest steps."""
    others = [path for _, path in reversed(_step_folders(root)) if path != keep]
    kept = 0
    for path in others:
        if kept < keep_last - 1 and _is_complete(path):
            kept += 1
        else:
            _remove_tree(path)


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
        meta_text = json.dumps(meta_out, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-serialisable: {e}") from e
    tensors = _model_tensors(model)

    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        _fsync_path(root.parent)
    _clean_leftovers(root)
    final = root / checkpoint_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        _write_folder(tmp, tensors, train_state, meta_text)
        _move_into_place(tmp, final)
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
    if p.is_file():
        if p.name in _FILES:
            return p.parent
        raise CheckpointError(f"{p}: not a checkpoint file (expected one of {', '.join(_FILES)})")
    if _STEP_RE.match(p.name) or any((p / name).exists() for name in _FILES):
        return p
    latest = find_latest_checkpoint(p)
    if latest is None:
        root = _checkpoints_root(p)
        raise CheckpointError(f"{p}: no complete checkpoint found (looked in {root})")
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


def _check_expected_meta(file: Path, meta: dict, expected: Mapping) -> None:
    """Raise CheckpointError if any ``expected`` entry differs from ``meta``."""
    for key, want in expected.items():
        have = meta.get(key, "<missing>")
        if have == want:
            continue
        if key == "model":
            raise CheckpointError(
                f"{file}: checkpoint is for model {have!r} but model {want!r} was requested"
            )
        raise CheckpointError(
            f"{file}: meta {key!r} is {have!r} in the checkpoint, expected {want!r}"
        )


def _read_model_state(file: Path) -> dict[str, torch.Tensor]:
    """Load model.safetensors or raise CheckpointError."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as e:  # safetensors raises SafetensorError, OSError, ...
        raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from e


def _read_train_state(file: Path) -> dict:
    """Load state.pt with ``weights_only=True`` or raise CheckpointError."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"{file}: refused to load state: it contains an object of type {found.group(1)}; "
                "only tensors, numbers, strings, lists, tuples and dicts are allowed (weights_only)"
            ) from e
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: corrupt or unreadable state.pt ({first_line})") from e
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise CheckpointError(f"{file}: corrupt state.pt (expected a dict, got {kind})")
    return state


def _listed(items: list[str]) -> str:
    """At most a few items, comma-separated, with a count of the rest."""
    shown = ", ".join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return shown + (f", ... and {rest} more" if rest > 0 else "")


def _check_model_keys(file: Path, meta: dict, state: Mapping, model: nn.Module) -> None:
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
        problems.append(f"missing keys ({len(missing)}): {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch ({len(mismatched)}): {_listed(mismatched)}")
    if problems:
        saved_for = f" (checkpoint model {meta['model']!r})" if "model" in meta else ""
        raise CheckpointError(
            f"{file}: weights do not match {type(model).__name__}{saved_for}: "
            + "; ".join(problems)
        )


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    expected_meta: Mapping[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Load a checkpoint and, if ``model`` is given, its weights (strict keys).

    ``path`` may be a checkpoint folder, a run folder (its latest checkpoint is
    used) or ``model.safetensors`` itself.  Every file is read and checked
    before ``model`` is touched.  Raises :class:`CheckpointError` naming the file
    for missing/corrupt files, refused (non weights-only) state, a meta entry
    differing from ``expected_meta``, or weights not matching ``model``.
    """
    folder = _resolve_folder(path)
    for name in _FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing checkpoint file")
    meta = _read_meta(folder / META_FILE)
    if expected_meta:
        _check_expected_meta(folder / META_FILE, meta, expected_meta)
    model_state = _read_model_state(folder / MODEL_FILE)
    train_state = _read_train_state(folder / STATE_FILE)
    if model is not None:
        _check_model_keys(folder / MODEL_FILE, meta, model_state, model)
        try:
            model.load_state_dict(model_state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{folder / MODEL_FILE}: could not load weights ({e})") from e
    return LoadedCheckpoint(folder, meta["step"], meta, model_state, train_state)


# ------------------------------------------------------------------------- RNG


def _python_rng_state() -> dict:
    """``random.getstate()`` as plain ints/lists."""
    version, internal, gauss_next = random.getstate()
    return {"version": version, "state": list(internal), "gauss_next": gauss_next}


def _numpy_rng_state() -> dict | None:
    """numpy's global (legacy) RNG state as tensors/ints/floats, or None without numpy."""
    try:
        import numpy as np
    except ImportError:
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def capture_rng_state() -> dict[str, Any]:
    """Snapshot torch (CPU and every CUDA device), numpy-global and ``random`` RNG states.

    CUDA states are captured once CUDA is initialized (never initializing it
    here).  The result holds only tensors, ints, floats, strings and lists, so
    it can go into ``train_state`` and survive a ``weights_only`` load.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_rng_state()}
    numpy_state = _numpy_rng_state()
    if numpy_state is not None:
        state["numpy"] = numpy_state
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _restore_cuda(states: list[torch.Tensor]) -> None:
    """Restore per-device CUDA RNG states, warning if the device count changed."""
    if not torch.cuda.is_available():
        warnings.warn("checkpoint has CUDA RNG states but CUDA is not available; skipped them")
        return
    count = torch.cuda.device_count()
    if len(states) != count:
        warnings.warn(f"checkpoint has CUDA RNG states for {len(states)} devices, found {count}")
    for index, device_state in enumerate(states[:count]):
        torch.cuda.set_rng_state(device_state.cpu(), index)


def _restore_numpy(state: Mapping) -> None:
    """Restore numpy's global RNG from :func:`_numpy_rng_state` output."""
    import numpy as np

    keys = np.asarray(torch.as_tensor(state["keys"]).numpy(), dtype=np.uint32)
    np.random.set_state(
        (
            state["bit_generator"],
            keys,
            int(state["pos"]),
            int(state["has_gauss"]),
            float(state["cached_gaussian"]),
        )
    )


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state` (parts present are restored)."""
    known = ("torch", "cuda", "numpy", "python")
    if not isinstance(state, Mapping) or not any(k in state for k in known):
        raise ValueError(f"not an RNG state from capture_rng_state(): expected keys among {known}")
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state:
        _restore_cuda(list(state["cuda"]))
    if "numpy" in state:
        _restore_numpy(state["numpy"])
    if "python" in state:
        py = state["python"]
        gauss = py["gauss_next"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), gauss))

