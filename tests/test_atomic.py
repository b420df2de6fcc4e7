"""widenet.files: a write either lands whole or leaves the old file untouched."""

from __future__ import annotations

import os
import signal
import stat

import pytest
import torch

from widenet.files import atomic_path, save_atomic, signals_held


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


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="signals cannot be held here")
def test_signals_held_arrive_when_the_block_ends():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append(signum))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []  # pending, not lost
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
