"""widenet.files: a write either lands whole or leaves the old file untouched."""

from __future__ import annotations

import os
import signal
import threading
import stat
import time

import pytest
import torch

from widenet import files
from widenet.files import atomic_path, save_atomic
from widenet.signals import signals_held


def test_a_finished_block_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "new" / "folder" / "data.txt"  # missing folders are created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.exists() and not target.exists()
        tmp.write_text("complete")
    assert target.read_text() == "complete"
    assert [p.name for p in target.parent.iterdir()] == ["data.txt"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_an_error_in_the_block_keeps_the_old_file(tmp_path, error):
    target = tmp_path / "data.txt"
    target.write_text("old")
    with pytest.raises(type(error)):
        with atomic_path(target, suffix=".part") as tmp:
            tmp.write_text("half")
            raise error
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]


def test_save_atomic_round_trips_tensors(tmp_path):
    target = tmp_path / "cache.pt"
    save_atomic({"x": torch.arange(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(3))


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_of_a_plain_open(tmp_path, umask, mode):
    """They used to keep mkstemp's 0600 whatever the umask: a tokenizer.json or TSV others could not read."""
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "atomic.txt") as tmp:
            tmp.write_text("x")
        save_atomic({"x": 1}, tmp_path / "saved.pt")
        with open(tmp_path / "plain.txt", "w") as handle:  # the oracle
            handle.write("x")
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("atomic.txt", "saved.pt", "plain.txt")}
    assert modes == {"atomic.txt": mode, "saved.pt": mode, "plain.txt": mode}


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="no signals to threads here")
@pytest.mark.parametrize("to_another_thread", [False, True])
def test_signals_held_arrive_when_the_block_ends(to_another_thread):
    """A signal the kernel hands to another thread (torch starts some at import) ran Python's handler
    inside the block: pthread_sigmask had held it for the calling thread only."""
    seen = []
    previous = signal.signal(signal.SIGTERM, handler := lambda signum, _frame: seen.append(signum))
    waiting = threading.Event()
    other = threading.Thread(target=waiting.wait)
    other.start()
    try:
        with signals_held():
            signal.pthread_kill(other.ident if to_another_thread else threading.get_ident(), signal.SIGTERM)
            time.sleep(0.05)  # time for the handler to run, were it not held
            assert seen == []  # pending, not lost
        assert seen == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):  # Python's own Ctrl-C handler, raised after the block
            with signals_held():
                signal.pthread_kill(other.ident, signal.SIGINT)
                signal.pthread_kill(other.ident, signal.SIGTERM)
                time.sleep(0.05)
                seen.append("block ended")
        # the Ctrl-C raising stopped neither SIGTERM's delivery nor its handler's restore
        assert seen[-2:] == ["block ended", signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        waiting.set()
        other.join()
        signal.signal(signal.SIGTERM, previous)


def test_temporaries_a_killed_writer_left_are_removed_a_day_later(tmp_path):
    """kill -9 during a cache write left its `.NAME.HEX.tmp` for good: caches grew by a copy each time."""
    target = tmp_path / "cache.pt"
    old, fresh = tmp_path / ".cache.pt.0123456789ab.tmp", tmp_path / ".cache.pt.ba9876543210.tmp"
    other = tmp_path / ".other.pt.0123456789ab.tmp"
    for leftover in (old, fresh, other):
        leftover.write_bytes(b"partial")
    day_ago = time.time() - files.STALE_TEMPORARY_S - 60
    for leftover in (old, other):
        os.utime(leftover, (day_ago, day_ago))
    with files.atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert not old.exists()  # stale, of this file: removed
    assert fresh.exists() and other.exists()  # perhaps being written; another file's: kept


def test_a_ctrl_c_during_the_restore_stops_no_restore_and_no_delivery(monkeypatch):
    """A new Ctrl-C just as SIGINT's own handler is back raised KeyboardInterrupt out of the restore,
    and the SIGTERM held in the block was never delivered (nor, before that, SIGTERM's handler put
    back)."""
    import types

    import widenet.signals as held_module

    seen, fired, real = [], [], signal.signal
    previous = signal.signal(signal.SIGTERM, handler := lambda signum, _frame: seen.append(signum))

    def restoring(sig, new):
        result = real(sig, new)
        if sig == signal.SIGINT and new is signal.default_int_handler and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return result

    shim = types.SimpleNamespace(**{k: getattr(signal, k) for k in dir(signal) if not k.startswith("__")})
    shim.signal = restoring
    monkeypatch.setattr(held_module, "signal", shim)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
        time.sleep(0.05)
        assert fired and seen == [signal.SIGTERM]
        assert real(signal.SIGTERM, handler) is handler  # restored before this
    finally:
        real(signal.SIGTERM, previous)
