"""Lists and counts inside messages: the first few items and a count of the rest; "1 step", "2 steps"."""

from __future__ import annotations

from collections.abc import Iterable


def listed(items: Iterable[object], shown: int = 5) -> str:
    """'a, b, c, d, e, ... and 3 more': at most `shown` items (str() of each), comma-separated."""
    items = [str(item) for item in items]
    rest = len(items) - shown
    return ", ".join(items[:shown]) + (f", ... and {rest} more" if rest > 0 else "")


def counted(count: float, noun: str, plural: str | None = None) -> str:
    """'1 step', '2 steps', '0 steps', '1 minute', '1.5 minutes' (a float as :g writes it): the count and
    its noun, plural unless the count is 1; plural: where it is not the noun + "s" (e.g. "classes")."""
    number = f"{count:g}" if isinstance(count, float) else str(count)
    return f"{number} {noun if number == '1' else plural or noun + 's'}"  # (0.9999999 prints as 1: "1 minute")
