"""What the task readers and encoders share: the error type, error locations, padding."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DatasetError, PathLike

__all__ = ["TaskDataError", "at", "pad_rows"]


class TaskDataError(DatasetError):
    """A task file (or the data handed to an encoder) is missing or malformed."""


def at(path: PathLike, line: int | None = None) -> str:
    """The location prefix of an error message: ``"file"`` or ``"file line 7"``."""
    return f"{path}" if line is None else f"{path} line {line}"


def pad_rows(rows: list[list[int]], pad: int) -> Tensor:
    """(len(rows), longest) int64, right-padded with ``pad``."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
