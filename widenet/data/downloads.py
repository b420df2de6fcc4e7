"""Where datasets live (WIDENET_DATA_HOME) and checksum-verified downloads."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from ..files import atomic_path
from .errors import DatasetError, PathLike

__all__ = ["data_home", "download_file"]

_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


def data_home() -> Path:
    """Root of widenet's data cache: ``$WIDENET_DATA_HOME`` or ``~/.cache/widenet``."""
    env = os.environ.get("WIDENET_DATA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "widenet"


def download_file(url: str, dest: PathLike, sha256: str, timeout: float = _DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying its SHA-256.

    The bytes go to a temporary file in the destination folder, which is
    renamed into place only when the checksum matches; on a mismatch it is
    deleted and :class:`DatasetError` is raised.
    """
    dest = Path(dest)
    with atomic_path(dest, suffix=".part") as tmp:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(_CHUNK), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != sha256:
            raise DatasetError(
                f"{dest.name}: checksum mismatch for {url}: expected SHA-256 {sha256}, "
                f"got {digest.hexdigest()}; the partial download was deleted"
            )
    return dest
