"""IDX files (MNIST's format: a magic number, the dimensions, then the raw array), gzipped or not."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from ..errors import DatasetError, DatasetNotFoundError, PathLike

__all__ = ["read_bytes", "read_idx"]


_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_bytes(path: Path, missing_hint: str = "") -> bytes:
    """The file's bytes; a missing or unreadable file raises a DatasetError naming it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path}: file not found{missing_hint}") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read file ({exc})") from exc


def _read_maybe_gzip(path: Path) -> bytes:
    """Return the file's bytes, gunzipped when it is (or is named) a .gz file."""
    raw = read_bytes(path)
    if path.suffix != ".gz" and raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a native-endian numpy array.

    Raises :class:`DatasetError` naming the file when the magic number, the
    dimensions or the data length are wrong, or the gzip stream is broken.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} "
            "(expected 0x0000 followed by a type byte such as 08 and the number of dimensions)"
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    if ndim == 0:
        raise DatasetError(f"{path}: IDX header declares zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header (needs {header} bytes, has {len(data)})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise DatasetError(f"{path}: IDX data {problem}: dimensions {dims} need {expected} bytes, found {actual}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)
