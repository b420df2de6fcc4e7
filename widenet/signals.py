"""The signals that stop a command, by number on this platform (no torch: the CLI names them before
torch loads)."""

from __future__ import annotations

import signal

__all__ = ["STOP_SIGNALS", "signal_numbers"]


def signal_numbers(*names: str) -> tuple[int, ...]:
    """The named signals this platform has (Windows: no SIGHUP)."""
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))


STOP_SIGNALS = signal_numbers("SIGINT", "SIGTERM", "SIGHUP")  # train.stopping, files.signals_held, cli_errors
