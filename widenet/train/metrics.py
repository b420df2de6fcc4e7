"""metrics.jsonl: one JSON object per line, appended as training goes.

Timing fields (TIMING_KEYS) are the only ones that differ between a run and
the same run killed and resumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

TIMING_KEYS = ("images_per_s", "tokens_per_s", "elapsed_s")


class MetricsLog:
    """Appends records to OUT/metrics.jsonl, flushing each line."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as err:  # a full disk's error names no file
            raise OSError(err.errno, err.strerror, str(self.path)) from None

    def truncate_after(self, step: int) -> None:
        """Keep only records with step <= `step` (a resumed run rewrites the rest).

        Written to a temporary file and renamed, so a crash here loses nothing.
        """
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def close(self) -> None:
        """Nothing to close (every write opens and closes the file); TensorBoardMetrics closes its writer."""


class NullMetrics:
    """MetricsLog stand-in for processes other than rank 0: writes nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsError(ValueError):
    """metrics.jsonl holds a line that is not a record (other than a torn last line)."""


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records. A torn last line (a kill mid-write) is skipped; any other line that is not a
    JSON object raises MetricsError naming it, since rewriting the file would drop it."""
    return list(_records(Path(path)))


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            yield record
        elif line.strip() and not (number == len(lines) and not line.endswith("\n")):
            raise MetricsError(f"{path} line {number}: not a metrics record ({line.strip()[:60]!r}); "
                               "delete or repair the line")


def without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
