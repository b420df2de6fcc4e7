"""The command line's error boundary: every expected failure in one line, a bug with its traceback.

Expected failures are the user's or the machine's: bad settings and files
(ValueError and the library's errors, all ValueErrors), a failed training run
(TrainingError), a torch that cannot compile, files that cannot be read or
written (OSError: the path and the cause; a full disk says "no space left on
device"), and memory that cannot be had (the size asked for). Anything else is
a bug: its traceback is shown, with a line asking for a report. Also how
output reaches the user: notes on stderr, and a training command's stdout
outliving a reader that goes away.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .signals import signal_numbers
from .train.stopping import handling

__all__ = ["CLIError", "BUG_REPORT", "INTERRUPTED", "explain", "file_names_printable",
           "latest_checkpoint_identity", "lost_results", "missing_outputs_to_devnull", "output_survives_its_reader",
           "rerun_advice", "say", "say_error", "say_last", "termination_interrupts", "Terminated", "warnings_as_notes"]

BUG_REPORT = ("widenet: this is a bug in widenet, not a problem with your input; please report it with the "
              "command and the traceback above")

INTERRUPTED = "widenet: interrupted"  # Ctrl-C, whenever it comes; the status is 130 (128 + SIGINT)

_ALLOCATION = re.compile(r"tried to allocate (\d+) bytes")
_CUDA_ALLOCATION = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")


class CLIError(Exception):
    """A user mistake found by the command line itself: printed as one line, exit status 2."""


def say(line: str) -> None:
    """A line on stderr that leaves a progress bar intact."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def say_error(message: str) -> None:
    """`widenet: error: message` as one write: under torchrun every process meets a bad setting, and
    lines written in pieces ran into each other; a process other than the first says which it is."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    named = message.startswith(f"process {rank} ")  # e.g. "process 1 lost the other processes"
    who = f" (process {rank} of {world})" if world not in ("", "1") and rank not in ("", "0") and not named else ""
    sys.stderr.write(f"widenet: error{who}: {message}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def warnings_as_notes() -> Iterator[None]:
    """Warnings (e.g. truncated sentences) as one `widenet: note: ...` line each, not Python's
    file:line form with a line of source, each distinct note once per command: Python's own "once
    per place" forgets what it showed whenever any code changes the warning filters (every
    catch_warnings block does), and compare-text said the same note for each of its runs. Under
    torchrun the first process alone says them (every process meets the same data)."""
    shown: set[str] = set()
    first = os.environ.get("RANK", "0") in ("", "0")

    def note(message: Warning | str, *_args: Any, **_kw: Any) -> None:
        if first and (line := f"widenet: note: {message}") not in shown:
            shown.add(line)
            say(line)

    with warnings.catch_warnings():
        warnings.showwarning = note
        yield


@contextlib.contextmanager
def file_names_printable() -> Iterator[None]:
    """File names that are not UTF-8 reach Python as surrogates (PEP 383), which stdout refuses to
    encode in a UTF-8 locale: a run in such a folder trained, saved, then failed at its last line.
    For the block they are written as the bytes they came from, as ls writes them (stderr already
    escapes them, as \\udcXX)."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
            changed.append(stream)
    try:
        yield
    finally:
        for stream in changed:
            with contextlib.suppress(ValueError, OSError):  # closed meanwhile
                stream.reconfigure(errors="strict")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP where a run cannot first save (no run is training, or a second signal):
    raised as Ctrl-C raises KeyboardInterrupt, so that the command lets go of what it holds (a run
    folder's lock, a run that --overwrite set aside) and ends with one line instead of silently."""

    def __init__(self, signum: int) -> None:
        self.status = 128 + signum  # what a shell reports for a process the signal ended
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def termination_interrupts() -> Iterator[None]:
    """While inside (the main thread only), SIGTERM and SIGHUP raise Terminated; a signal ignored
    from the start (`nohup`) stays ignored. A training run replaces these while it trains (train.stopping)."""
    def interrupt(signum: int, _frame) -> None:
        raise Terminated(signum)

    with handling(signal_numbers("SIGTERM", "SIGHUP"), interrupt):
        yield


def missing_outputs_to_devnull() -> list[str]:
    """A command started with stdout or stderr closed (`2>&-`, some daemons) writes them to /dev/null:
    Python leaves sys.stderr None there, which ended training at its progress bar, and the next file
    opened would take descriptor 2, where a library's C++ warnings would then land. Returns the names
    of those that were closed (lost_results says when that loses a command's product)."""
    closed = []
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            closed.append(name)
        null = os.open(os.devnull, os.O_WRONLY)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "w", closefd=False))
    return closed


RESULTS_ON_STDOUT = ("list", "params", "eval", "predict", "bench")  # commands whose product is their output


def lost_results(command: str, closed: list[str]) -> str | None:
    """The error for a command whose results would go to a closed stdout (`>&-`: predict exited 0
    having printed its predictions nowhere), else None."""
    if "stdout" in closed and command in RESULTS_ON_STDOUT:
        return (f"standard output is closed, so what {command} prints would be lost; send it to a file "
                "(or to /dev/null to discard it)")
    return None


@contextlib.contextmanager
def output_survives_its_reader(training: bool) -> Iterator[None]:
    """For a training command, a reader that goes away (`| head`, a closed pager, a `tee` killed with
    its process group, a closed terminal) must not end the run before its next checkpoint: the rest
    of stdout is dropped with one note on stderr, the rest of stderr silently, and training goes on.
    Other commands stop quietly (main)."""
    if not training:
        yield
        return
    stdout, stderr = sys.stdout, sys.stderr
    if hasattr(stdout, "reconfigure"):  # each progress line reaches a pipe (| tee) when printed
        stdout.reconfigure(line_buffering=True)
    sys.stdout = _ReaderTolerant(stdout, "widenet: note: the reader of the output went away; training goes on "
                                         "without printing")
    sys.stderr = _ReaderTolerant(stderr, None)  # the note above goes through it
    guarded = (sys.stdout, sys.stderr)
    try:
        yield
    finally:
        for stream in guarded:  # what is still buffered, while a lost reader is still forgiven
            stream.flush()
        sys.stdout, sys.stderr = stdout, stderr


def say_last(line: str) -> None:
    """A command's last line on stderr, which may have no reader left (a killed `tee`, `2>&-`)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        print(line, file=sys.stderr, flush=True)


class _ReaderTolerant:
    """A text stream that, once its reader has gone (a broken pipe, or EIO from a terminal that
    closed), writes to nothing, after a note on stderr if one is given."""

    def __init__(self, stream: Any, note: str | None) -> None:
        self._stream, self._note, self._closed = stream, note, False

    def write(self, text: str) -> int:
        if not self._closed:
            try:
                return self._stream.write(text)
            except OSError as err:
                self._drop(err)
        return len(text)

    def flush(self) -> None:
        if not self._closed:
            try:
                self._stream.flush()
            except OSError as err:
                self._drop(err)

    def _drop(self, err: OSError) -> None:
        if err.errno not in (errno.EPIPE, errno.EIO):
            raise err
        self._closed = True
        with contextlib.suppress(OSError, ValueError, AttributeError):  # the interpreter's last flush too
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        if self._note:
            print(self._note, file=sys.stderr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def explain(err: BaseException, out: str | None = None, after_full_disk: str = "run it again") -> str | None:
    """The one-line message for an expected failure (without the "widenet: error: " prefix), or
    None for a bug. `out`: the command's --out, named when a write failed without a path;
    after_full_disk: what to do once space is freed (e.g. "--resume" where a checkpoint waits)."""
    from .runtime import CompileUnavailable, first_line
    from .train.trainer import TrainingError

    if isinstance(err, MemoryError):
        return f"out of memory: {first_line(err)}" if str(err).strip() else "out of memory"
    if isinstance(err, OSError):
        return describe_os_error(err, out, after_full_disk)
    if isinstance(err, RuntimeError) and (memory := _allocation_failure(err)):
        return memory
    if isinstance(err, (CLIError, ValueError, TrainingError, CompileUnavailable)):
        return first_line(err)
    if _is_compile_failure(err):
        return f"torch.compile failed ({first_line(err)}); run without --compile"
    return None


def describe_os_error(err: OSError, out: str | None = None, after_full_disk: str = "run it again") -> str:
    """"PATH: cause" (both paths of a rename); a full disk as "no space left on device", with what to
    do once space is freed."""
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    where = " -> ".join(paths) if paths else (f"writing under {out}" if out else "")
    if err.errno == errno.ENOSPC:
        return f"no space left on device ({where or 'a write failed'}); free some space and {after_full_disk}"
    if not paths and err.strerror is None and str(err):  # raised with a message of its own, paths in it
        return str(err)
    cause = err.strerror or str(err) or type(err).__name__
    return f"{where}: {cause}" if where else cause


def latest_checkpoint_identity(out: str | None) -> tuple | None:
    """Which checkpoint folder is the newest in run folder `out` (path, inode, mtime), or None: taken
    before a command runs, it tells at a failure whether the checkpoint there now is an earlier one."""
    if not out:
        return None
    from .train.checkpoint_layout import find_latest_checkpoint

    try:
        latest = find_latest_checkpoint(out)
        if latest is None:
            return None
        status = latest.stat()
    except (OSError, ValueError):  # advice only: a folder it cannot read has no checkpoint to resume
        return None
    return str(latest), status.st_ino, status.st_mtime_ns


def rerun_advice(out: str | None, resumable: bool, overwrite: bool, before: tuple | None) -> str:
    """How to go on after a run failed (a full disk, once space is freed) or was stopped at once:
    --resume only where `out` holds a checkpoint the command (resumable: train, pretrain, finetune)
    can continue, its own or the run it resumed. before: latest_checkpoint_identity(out) when the
    command began."""
    if not resumable or not out:
        return "run it again"
    now = latest_checkpoint_identity(out)
    if now is None:
        from .train.run_folder import earlier_run

        with contextlib.suppress(OSError):
            if not earlier_run(Path(out)):  # nothing a plain run would refuse
                return "run it again"
        return "run it again with --overwrite (the run saved no checkpoint to resume from)"
    if overwrite and now == before:  # the run --overwrite was to replace was put back: resuming would continue it
        return "run it again with --overwrite (the earlier run in the folder was put back)"
    return "--resume"


def _allocation_failure(err: RuntimeError) -> str | None:
    """torch's allocator failures (CPU: "can't allocate memory: you tried to allocate N bytes";
    CUDA: torch.OutOfMemoryError) as one line with the size asked for."""
    text = str(err)
    if (found := _ALLOCATION.search(text)) and "allocate" in text:
        from .memory import readable_size  # torch is loaded: it raised this

        return f"out of memory: an allocation of {readable_size(int(found.group(1)))} failed"
    if type(err).__name__ == "OutOfMemoryError":
        found = _CUDA_ALLOCATION.search(text)
        return "out of GPU memory" + (f": an allocation of {found.group(1)} failed" if found else "")
    return None


def _is_compile_failure(err: BaseException) -> bool:
    """An error raised by torch.compile's machinery (only possible once it was imported)."""
    dynamo = sys.modules.get("torch._dynamo.exc")
    return dynamo is not None and isinstance(err, (dynamo.BackendCompilerFailed, dynamo.TorchDynamoException))
