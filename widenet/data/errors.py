"""Errors of the data loaders (ValueErrors: the CLI prints their message as one line)."""

from __future__ import annotations

import os

__all__ = ["DatasetError", "DatasetNotFoundError", "PathLike"]

PathLike = str | os.PathLike


class DatasetError(ValueError):
    """A dataset file is corrupt, truncated, malformed or unusable."""


class DatasetNotFoundError(DatasetError):
    """The dataset files could not be found; the message says how to get them."""
