"""Filesystem helpers: atomic and durable writes, atomic swaps, live-process checks, lock files.

Used by the dataset downloads and caches, the tokenizer, the checkpoints and
the run folders: a reader never sees half a file, a crash leaves the previous
file whole, and two processes never write one run folder at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = ["STALE_TEMPORARY_S", "CacheDamaged", "LockHeld", "RefusedPickle", "WeightsDamaged", "WeightsMismatch",
           "atomic_path", "disk_full", "file_sha256", "file_stamp", "fsync_path", "hold_lock", "is_utf8", "live_holder",
           "load_cache", "load_safetensors", "load_weights_only", "pid_alive", "raise_if_disk_full", "refuse_dead_link",
           "no_folder_at", "refuse_non_folder", "rename_exchange", "save_atomic", "save_cache", "save_safetensors",
           "tensors_digest", "write_bytes_durably"]


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh temporary file beside ``path`` for the block to write.

    When the block ends without an error the file is renamed onto ``path``
    (atomic on POSIX and Windows within one folder); on any error, Ctrl-C
    included, it is removed and ``path`` is left as it was. The folder is
    created if missing. The file gets the permissions a plain ``open(path, "w")`` would give
    (0666 less the umask, e.g. 0644), not mkstemp's private 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent, f".{path.name}.", suffix)
    tmp = _create_new_file(path.parent, f".{path.name}.", suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


STALE_TEMPORARY_S = 24 * 3600  # a temporary file this old was left by a writer that was killed


def _remove_stale_temporaries(folder: Path, prefix: str, suffix: str) -> None:
    """Delete temporary files of atomic_path's naming that a killed writer left (kill -9 skips the
    clean-up): unchanged for a day, none is being written (a cache of a few GB takes minutes)."""
    now = time.time()
    for stale in folder.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        with contextlib.suppress(OSError):  # gone meanwhile, or another user's: best effort
            if now - stale.lstat().st_mtime > STALE_TEMPORARY_S and stale.is_file():
                stale.unlink()


def _create_new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """An empty file of a new random name in ``folder``, created as mkstemp does (O_EXCL: never an
    existing file or link) but with mode 0666, which the kernel narrows by the umask and the folder's
    default ACL as for any other new file: read no umask here (os.umask can only be read by setting
    it, a race with other threads creating files), and chmod nothing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        candidate = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(candidate, flags, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "no unused temporary file name found", str(folder))


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save ``obj`` to ``path`` through atomic_path; a full disk raises OSError(ENOSPC)
    (torch.save reports it as a RuntimeError)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # closed on failure too (the tmpfs can go)
        try:
            torch.save(obj, handle)
            handle.flush()  # here, where a full disk is still named by its file
        except (RuntimeError, OSError) as err:
            raise_if_disk_full(err, path)
            raise


_CACHE_DIGEST = "tensors_sha256"  # a cache's key for the digest of its tensors


class CacheDamaged(ValueError):
    """A cache file whose tensors no longer match the digest saved with them."""


def save_cache(payload: dict[str, Any], path: Path) -> None:
    """save_atomic a cache (a dict of tensors and plain values) with a digest of its tensors
    (tensors_digest), which load_cache checks: a cache damaged in place, at its size, is rebuilt
    rather than trained on."""
    save_atomic({**payload, _CACHE_DIGEST: tensors_digest(_tensors_of(payload))}, path)


def load_cache(path: Path) -> Any:
    """What save_cache wrote (load_weights_only); CacheDamaged where the tensors do not match their
    digest. Caches written without one load as they are."""
    cached = load_weights_only(path)
    if isinstance(cached, dict) and _CACHE_DIGEST in cached and \
            tensors_digest(_tensors_of(cached)) != cached[_CACHE_DIGEST]:
        raise CacheDamaged("its tensors do not match the checksum saved with them: damaged on disk or in a copy")
    return cached


def _tensors_of(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}


def disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a failed write into `folder` failed for want of space. torch.save says so only as
    "unexpected pos" or "file write failed", safetensors as "os error 28": the text and the free
    space together tell."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    text = str(err).lower()
    if "no space left" in text or "os error 28" in text:
        return True
    if "unexpected pos" not in text and "file write failed" not in text:
        return False
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def raise_if_disk_full(err: BaseException, path: Path) -> None:
    """Raise OSError(ENOSPC) naming `path` when `err` was a write failing on a full disk."""
    if disk_full(err, path.parent):
        raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None


class RefusedPickle(ValueError):
    """A torch file holds more than tensors and plain data: loading it would run code."""


def load_weights_only(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU. A file that would need code to load
    raises RefusedPickle naming what it asked for; torch's own text, which suggests retrying with
    ``weights_only=False`` (the one thing not to do with such a file), is not passed on."""
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols in damaged files
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise RefusedPickle(f"{path}: this file tries to run code (it asks for {found.group(1)}); "
                                "it was not loaded") from None
        raise pickle.UnpicklingError("malformed pickle data") from None


@contextlib.contextmanager
def _openable_name(path: str | os.PathLike) -> Iterator[str | None]:
    """A name of `path` that safetensors can open (it takes UTF-8 paths only): the path itself; for a
    folder named in another encoding (its undecodable bytes held as surrogates), the file inside the
    folder opened by descriptor (/proc/self/fd/N/NAME, Linux); None where neither works."""
    name = os.fspath(path)
    if is_utf8(name):
        yield name
        return
    folder, base = os.path.split(name)
    if not (is_utf8(base) and os.path.isdir("/proc/self/fd")):
        yield None
        return
    fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        yield f"/proc/self/fd/{fd}/{base}"
    finally:
        os.close(fd)


def is_utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8: text from a command line, stdin or a file name that was not UTF-8
    reaches Python with its undecodable bytes as lone surrogates (PEP 383), which do not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def file_stamp(path: Path) -> list[int]:
    """A file's size and its modification and change times (ns): what a cache keys on to notice that
    the file changed. The change time (st_ctime) is set by the system whenever a file is written,
    replaced or touched, and cannot be set back: a file replaced by another of the same size and
    modification time (an archive packed with fixed times, `cp -p`, `touch -r`) still stamps anew."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


class WeightsDamaged(ValueError):
    """A .safetensors file whose tensors no longer hash to the digest widenet saved with them."""


_DIGEST_KEY = "widenet_sha256"  # in a .safetensors file's metadata: tensors_digest of what was saved


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: each one's name, dtype and shape ("name dtype shape"), then its bytes,
    in name order. Weights files carry it; training runs record a text run's data by it."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class WeightsMismatch(ValueError):
    """A .safetensors file whose tensors are not the ones another file recorded (tensors_digest)."""


def load_safetensors(path: str | os.PathLike, expect_digest: str | None = None) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors on the CPU, wherever it lies (see _openable_name; where no name
    serves, the file is read whole through a Python file handle). A file widenet wrote carries a
    digest of its tensors: tensors that no longer match it (a damaged disk or copy that kept the
    file's size) raise WeightsDamaged. expect_digest: the digest widenet wrote the tensors with (an
    export's config.json records its weights'): a file widenet wrote with another raises WeightsMismatch
    (one saved by another tool, e.g. weights edited in a script, carries none and is read as it is)."""
    from safetensors import safe_open
    from safetensors.torch import load

    with _openable_name(path) as name:
        if name is not None:
            with safe_open(name, framework="pt", device="cpu") as f:  # what load_file does, and the metadata
                tensors, saved = {key: f.get_tensor(key) for key in f.keys()}, (f.metadata() or {}).get(_DIGEST_KEY)
        else:
            with open(path, "rb") as f:
                data = f.read()
            tensors, saved = load(data), _header_metadata(data).get(_DIGEST_KEY)
    if saved is not None and tensors_digest(tensors) != saved:
        raise WeightsDamaged(f"{os.fspath(path)}: the weights do not match the checksum saved with them: the file "
                             "was damaged after it was written (a failing disk or an incomplete copy)")
    if expect_digest is not None and saved is not None and saved != expect_digest:  # (a file saved elsewhere: trusted)
        raise WeightsMismatch(f"{os.fspath(path)}: the digest recorded for its weights does not match them")
    return tensors


def _header_metadata(data: bytes) -> dict[str, str]:
    """The metadata in a .safetensors file's header (8 bytes of its length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]).get("__metadata__") or {}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> str:
    """Write tensors as a .safetensors file, wherever it goes (see load_safetensors), with a digest
    of them in its metadata; returns the digest."""
    from safetensors.torch import save, save_file

    metadata = {**(metadata or {}), _DIGEST_KEY: tensors_digest(tensors)}
    with _openable_name(path) as name:
        if name is not None:
            save_file(tensors, name, metadata=metadata)
            return metadata[_DIGEST_KEY]
    with open(path, "wb") as f:
        f.write(save(tensors, metadata=metadata))
    return metadata[_DIGEST_KEY]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_dead_link(path: Path) -> None:
    """Raise OSError (one line) where ``path`` is a symbolic link that leads nowhere (no target, a loop)."""
    if path.is_symlink() and not path.exists():
        raise OSError(errno.ENOENT, f"a symbolic link to {os.readlink(path)}, which leads nowhere (a missing target "
                                    "or a loop of links); point it at a folder or remove it", str(path))


def no_folder_at(path: Path, flag: str | None = None, way_out: str = "") -> str | None:
    """Why no folder can be made at `path` (setting `flag`, if one) in one line with the way out (by default
    "choose another FLAG" or destination): a file stands there, or where a folder above it would. Else None."""
    above = next((p for p in (path, *path.parents) if p.exists()), Path("."))  # the nearest that exists
    if above.is_dir():
        return None
    where = " ".join(filter(None, (flag, str(path)))) + ("" if above == path else f": {above}")
    return f"{where} is a file, not a folder; {way_out or 'choose another ' + (flag or 'destination')}"


def refuse_non_folder(path: Path, flag: str | None = None, way_out: str = "") -> None:
    """Raise refuse_dead_link's OSError (for `path` or a folder above it), or NotADirectoryError (ENOTDIR)."""
    for link in (path, *path.parents):
        refuse_dead_link(link)
    if (why := no_folder_at(path, flag, way_out)) is not None:
        err = NotADirectoryError(why)  # (no filename: str(err) would be "[Errno 20] None: PATH")
        err.errno = errno.ENOTDIR
        raise err


def fsync_path(path: Path) -> None:
    """fsync a file or (on POSIX) a directory."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (so its temp folder may still be in use)."""
    if pid == os.getpid():
        return False  # our own leftovers: saving is not re-entrant
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap ``a`` and ``b`` (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    c_int, c_path = ctypes.c_int, ctypes.c_char_p
    renameat2.argtypes = [c_int, c_path, c_int, c_path, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names it."""


@contextlib.contextmanager
def hold_lock(path: Path, warn: Callable[[str], None] = print) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` for the block, or raise LockHeld at once.

    The lock is ``flock``'s, so the kernel drops it when its holder dies: no
    lock outlives its process, whatever killed it. The file records the
    holder ("pid PID on HOST since TIME") and is deleted on release; finding
    it unlocked but still there means the last holder ended without releasing
    it (a kill -9), which ``warn`` reports before the lock is taken over.
    Where the filesystem has no locks, ``warn`` says so and the block runs
    unlocked.
    """
    fd = _lock_file(path, warn)
    try:
        stale = _read_holder(fd)
        if stale:
            warn(f"widenet: warning: taking over {path.name} in {path.parent} from {stale}, "
                 "which ended without releasing it")
        stamp = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        with contextlib.suppress(OSError):  # the lock holds without it (e.g. on a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, stamp.encode(), 0)
        yield
    finally:  # on any exit, while still locked: a process waiting on this file then retries
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # closing the descriptor releases the flock


def _lock_file(path: Path, warn: Callable[[str], None]) -> int:
    """A descriptor of ``path`` holding its flock (the file as it is now at that path, not one
    unlinked by a holder that just ended). A symbolic link there is refused, not followed: the
    lock file is truncated and written, and a link would have that done to its target."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locks
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise OSError(errno.ELOOP, "a symbolic link where the run's lock file belongs (it would overwrite "
                                       "what the link points to); remove the link", str(path)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd) or "another process"
            os.close(fd)
            raise LockHeld(f"{path.parent} is in use by {holder}") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            warn(f"widenet: warning: {path.parent}'s filesystem has no file locks; "
                 "a second run into it would not be stopped")
            return fd
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder before us deleted this file after we opened it: take the new one


def _read_holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()


def live_holder(path: Path) -> str | None:
    """Who holds the lock file ``path`` ("pid PID on HOST since TIME"), read without taking it: None
    when there is none or its holder ended (a process of this host that is gone). A holder on another
    host counts as live (its processes cannot be seen from here)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        holder = _read_holder(fd)
    finally:
        os.close(fd)
    match = re.match(r"pid (\d+) on (\S+)", holder)
    if match is None or (match.group(2) == socket.gethostname() and not pid_alive(int(match.group(1)))):
        return None
    return holder
