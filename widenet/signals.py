"""The signals that stop a command, by number on this platform (no torch: the CLI names them before
torch loads)."""

from __future__ import annotations

import signal
import threading

__all__ = ["NATIVE_CALL_THREAD", "STOP_SIGNALS", "native_call_running", "signal_numbers"]


def signal_numbers(*names: str) -> tuple[int, ...]:
    """The named signals this platform has (Windows: no SIGHUP)."""
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))


STOP_SIGNALS = signal_numbers("SIGINT", "SIGTERM", "SIGHUP")  # train.stopping, files.signals_held, cli_errors

# The thread a long native call runs in, so that a stop signal is handled at once (tokenizer training:
# data.text.tokenizer). A command stopped meanwhile abandons it, and its process must end without
# Python's finalization (cli.run): the thread, pulling texts from Python inside the Rust trainer,
# would be stopped there by pthread_exit, which aborts the process ("exception not rethrown").
NATIVE_CALL_THREAD = "widenet-native-call"


def native_call_running() -> bool:
    """Whether a NATIVE_CALL_THREAD is still running (an abandoned native call)."""
    return any(t.name == NATIVE_CALL_THREAD and t.is_alive() for t in threading.enumerate())
