"""CIFAR-10 / CIFAR-100 ("python version" pickle batches), unpickled with a restricted unpickler
that builds numpy arrays and nothing else."""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DatasetError, DatasetNotFoundError, PathLike
from .dataset import ImageDataset, check_split
from .idx import read_bytes

__all__ = ["CIFAR10_CLASSES", "load_cifar"]


CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

_CIFAR_LAYOUT = {
    # variant: (folder name, train files, test files, meta file, label key, names key)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
}

_CIFAR_HELP = (
    "Download the 'python version' archive from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "extract it, and pass the extracted folder (or its parent) as data_dir / --data-dir."
)


def _numpy_global(name: str) -> Any:
    """The numpy object behind a pickled global, looked up without importing by name."""
    core = getattr(np, "_core", None) or np.core
    table: dict[str, Any] = {
        "ndarray": np.ndarray,
        "dtype": np.dtype,
        "_reconstruct": core.multiarray._reconstruct,
        "scalar": core.multiarray.scalar,
        "_frombuffer": core.numeric._frombuffer,
    }
    return table[name]


# Globals a CIFAR pickle may reference: numpy array/dtype reconstruction and the
# Python-2 bytes encoding helper. Anything else is refused.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_ALLOWED_GLOBALS``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load forbidden global {module}.{name}")
        if module == "_codecs":
            return codecs.encode
        return _numpy_global(name)


def _unpickle(path: Path) -> dict[str, Any]:
    """Restricted-unpickle a CIFAR batch and return a dict with str keys."""
    raw = read_bytes(path, f" (CIFAR). {_CIFAR_HELP}")
    try:
        # latin1 is numpy's documented way to load Python-2 pickles of arrays.
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as exc:  # pickle raises many types on corrupt input
        raise DatasetError(f"{path}: not a valid CIFAR pickle batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in obj.items()}


def _cifar_folder(root: Path, variant: str) -> Path:
    folder_name, train_files = _CIFAR_LAYOUT[variant][:2]
    for candidate in (root / folder_name, root):
        if (candidate / train_files[0]).is_file() or (candidate / _CIFAR_LAYOUT[variant][2][0]).is_file():
            return candidate
    raise DatasetNotFoundError(f"no {variant} batches found in {root} or {root / folder_name}. {_CIFAR_HELP}")


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or label_key not in batch:
        raise DatasetError(f"{path}: CIFAR batch lacks the 'data' or '{label_key}' entry (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: expected {len(data)} integer labels, got {labels.dtype} {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_classes(folder: Path, variant: str) -> list[str]:
    meta_name, names_key = _CIFAR_LAYOUT[variant][3], _CIFAR_LAYOUT[variant][5]
    meta_path = folder / meta_name
    if not meta_path.is_file():
        return list(CIFAR10_CLASSES) if variant == "cifar10" else [str(i) for i in range(100)]
    meta = _unpickle(meta_path)
    if names_key not in meta:
        raise DatasetError(f"{meta_path}: meta file lacks '{names_key}'")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[names_key]]


def load_cifar(root: PathLike, variant: str = "cifar10", split: str = "train") -> ImageDataset:
    """Load CIFAR-10 or CIFAR-100 (fine labels) from the python pickle batches.

    ``root`` is the extracted ``cifar-10-batches-py`` / ``cifar-100-python``
    folder or its parent.
    """
    if variant not in _CIFAR_LAYOUT:
        raise ValueError(f"variant must be one of {sorted(_CIFAR_LAYOUT)}, got {variant!r}")
    check_split(split)
    folder = _cifar_folder(Path(root), variant)
    _, train_files, test_files, _, label_key, _ = _CIFAR_LAYOUT[variant]
    parts = [_cifar_batch(folder / name, label_key) for name in (train_files if split == "train" else test_files)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageDataset(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels),
        classes=_cifar_classes(folder, variant),
        name=f"{variant}-{split}",
    )
