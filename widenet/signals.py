"""The signals that stop a command, by number on this platform (no torch: the CLI names them before
torch loads), and holding them off for a few steps that must not be cut apart."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

__all__ = ["NATIVE_CALL_THREAD", "STOP_SIGNALS", "abandon_native_call", "native_call_abandoned", "signal_numbers",
           "signals_held"]


def signal_numbers(*names: str) -> tuple[int, ...]:
    """The named signals this platform has (Windows: no SIGHUP)."""
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))


STOP_SIGNALS = signal_numbers("SIGINT", "SIGTERM", "SIGHUP")  # train.stopping, signals_held, cli_errors

# The thread a long native call runs in, so that a stop signal is handled at once (tokenizer training:
# data.text.tokenizer). A command stopped meanwhile abandons it, and its process must end without
# Python's finalization (cli.run): that thread, or the Rust trainer's own worker threads, which pull
# texts from Python, would be stopped inside Rust by pthread_exit, which aborts the process ("FATAL:
# exception not rethrown"). The abandonment itself is noted: a Ctrl-C that lands inside the wait
# (Thread.join / is_alive) can leave the thread marked as stopped while it still runs (CPython
# releases its lock on an interrupted wait), and in 1 of 15-20 stops the process then finalized
# with the trainer running (a core dump showed it) and aborted.
NATIVE_CALL_THREAD = "widenet-native-call"
_abandoned = threading.Event()


def abandon_native_call() -> None:
    """Note that the wait for a NATIVE_CALL_THREAD ended before the call did (a stop signal)."""
    _abandoned.set()


def native_call_abandoned() -> bool:
    """Whether a native call was abandoned in this process: its threads may still call into Python.
    (Asked of the flag alone: whether its thread looks alive is what misled before.)"""
    return _abandoned.is_set()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block ends (they are acted on then): for a few
    renames that must all happen or none (a run put back in its folder). Their Python handlers are
    swapped for one that notes them, and the signals are raised again afterwards: blocking them
    (pthread_sigmask) holds them for the calling thread only, and with torch's own threads the
    kernel handed them to another, so Python's handler interrupted the block anyway. Python runs
    handlers in the main thread alone, so a block in another thread is not interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    held = [(sig, handler) for sig, handler in previous.items() if handler not in (signal.SIG_IGN, None)]
    try:
        for sig, _ in held:  # (an ignored signal stays ignored)
            signal.signal(sig, lambda signum, _frame: arrived.append(signum))
        yield
    finally:  # a restored handler raising (Ctrl-C) as its signal arrives stops no restore and no delivery
        errors = (_every_call(lambda pair: signal.signal(*pair), held), _every_call(signal.raise_signal, arrived))
        first = next((err for err in errors if err is not None), None)
        if first is not None:
            raise first


def _every_call(call: Callable[[Any], Any], items: list) -> BaseException | None:
    """call(item) for every item (a copy of the list), and the first exception raised meanwhile, or
    None: a restored handler that raises (KeyboardInterrupt) as its signal arrives interrupts the
    loop, which goes on from the item at hand (a handler installed twice is harmless; a signal whose
    own handler raised is not raised twice)."""
    remaining, error = list(items), None
    while remaining:
        try:
            while remaining:
                call(remaining[0])
                del remaining[0]
        except BaseException as err:  # kept, and returned once every call ran
            error = error or err
            if remaining and call is signal.raise_signal:
                del remaining[0]  # it was delivered: its handler is what raised
    return error
