"""Atomic file writes for downloads and caches: a reader never sees half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh temporary file beside ``path`` for the block to write.

    When the block ends without an error the file is renamed onto ``path``
    (atomic on POSIX and Windows within one folder); on any error, Ctrl-C
    included, it is removed and ``path`` is left as it was. The folder is
    created if missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save ``obj`` to ``path`` through atomic_path."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
