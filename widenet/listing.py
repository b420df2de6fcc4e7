"""Lists inside messages: the first few items and a count of the rest."""

from __future__ import annotations

from collections.abc import Iterable


def listed(items: Iterable[object], shown: int = 5) -> str:
    """'a, b, c, d, e, ... and 3 more': at most `shown` items (str() of each), comma-separated."""
    items = [str(item) for item in items]
    rest = len(items) - shown
    return ", ".join(items[:shown]) + (f", ... and {rest} more" if rest > 0 else "")
