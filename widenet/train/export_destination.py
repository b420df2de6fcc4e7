"""Where an export goes (exported.write_export): the destination checked, the files a user put
beside an earlier model carried over, the new folder moved into place, and what a killed export
left beside it cleared.

An export is written into OUT's sibling `.tmp-NAME-PID` and then renamed onto OUT (swapped with an
existing one atomically where the OS can; elsewhere the old one is renamed to `.old-NAME-PID`
first), so OUT is always a whole model folder or absent.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from ..files import STALE_TEMPORARY_S, fsync_path, no_folder_at, pid_alive, refuse_non_folder, rename_exchange
from ..models.hf import is_hf_folder
from ..signals import signals_held
from .checkpoint_layout import CHECKPOINTS_DIR, LATEST_FILE, remove_tree, step_folders

__all__ = ["CONFIG_FILE", "HF_MODEL_FILES", "MODEL_FILES", "TOKENIZER_FILE", "WEIGHTS_FILE", "carry_user_files",
           "check_destination", "clear_leftovers", "move_into_place", "temporary"]

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
# A model folder's own files, which --overwrite replaces: a widenet export's (MODEL_FILES), or what a
# Hugging Face folder (which `export --format hf` writes) holds of its model: weights, their shards and
# index, adapters, configs, tokenizer files (HF_MODEL_FILES, patterns). The rest (a README, plots) is the
# user's: --overwrite carries it into the new folder.
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
HF_MODEL_FILES = (CONFIG_FILE, "model*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                  "pytorch_model.bin.index.json", "tf_model*.h5", "tf_model.h5.index.json", "flax_model*.msgpack",
                  "flax_model.msgpack.index.json", "adapter_config.json", "adapter_model.*", "tokenizer*",
                  "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.txt", "vocab.json",
                  "merges.txt", "spiece.model", "spm.model", "sentencepiece.bpe.model", "preprocessor_config.json",
                  "generation_config.json")


def temporary(out: Path, old: bool = False) -> Path:
    """The sibling of OUT an export of this process is written into, `.tmp-NAME-PID` (old: where an
    existing OUT waits while a new one moves in, where no atomic swap exists: `.old-NAME-PID`, a
    name no export's working folder has)."""
    return out.parent / f"{'.old' if old else '.tmp'}-{out.name}-{os.getpid()}"


def clear_leftovers(out: Path, holds_model: Callable[[Path], bool]) -> None:
    """Remove what exports to OUT left when killed (a kill -9 skips every clean-up): their working
    folders, once their process is gone and they are a day old (STALE_TEMPORARY_S: a process on
    another machine sharing the folder is not seen to be alive). An old model set aside for a swap
    that a kill interrupted is put back where OUT is missing."""
    pattern = re.compile(rf"\.(tmp|old)-{re.escape(out.name)}-(\d+)")
    name = glob.escape(out.name)
    for entry in [*out.parent.glob(f".tmp-{name}-*"), *out.parent.glob(f".old-{name}-*")]:
        match = pattern.fullmatch(entry.name)
        if match is None or pid_alive(int(match.group(2))):
            continue
        with contextlib.suppress(OSError):  # best effort: another user's, or gone meanwhile
            if match.group(1) == "old" and holds_model(entry):
                if not out.exists() and not out.is_symlink():
                    os.rename(entry, out)
            elif time.time() - entry.lstat().st_mtime > STALE_TEMPORARY_S:
                remove_tree(entry)


def check_destination(out: Path, overwrite: bool, protect: str | os.PathLike | None,
                      holds_model: Callable[[Path], bool]) -> None:
    """Refuse a destination whose replacement would lose work (see exported.write_export); holds_model:
    whether a folder holds a widenet model (exported.is_export)."""
    if protect is not None:
        src, dest = Path(protect).resolve(), out.resolve()
        if dest == src or src.is_relative_to(dest) or dest.is_relative_to(src):
            raise ValueError(f"{out}: the destination must be a folder apart from the source {protect}")
    if not out.is_file():  # a file at `out` itself is refused below, with what to do
        refuse_non_folder(out)
    holder = next((p for p in out.resolve().parents if _holds_checkpoints(p)), None)
    if holder is not None:  # among a run's checkpoints, where training would take it for one (and prune it)
        raise ValueError(f"{out}: the destination lies inside {holder}, which holds a run's checkpoints; "
                         "choose a folder outside it")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise FileExistsError(no_folder_at(out) or f"{out} exists and is not a folder; choose another destination")
    if not any(out.iterdir()):
        return
    if not holds_model(out):
        raise FileExistsError(f"{out} already holds files that are not a model folder (a run, a dataset?); "
                              "choose another destination")
    if not overwrite:
        raise FileExistsError(f"{out} already holds a model (a widenet or Hugging Face folder); pass --overwrite to "
                              "replace it")


def _holds_checkpoints(folder: Path) -> bool:
    """Whether folder is a run's checkpoints folder (OUT/checkpoints, or OUT itself in the layout
    before it): a `latest` file, or step_* folders in one named checkpoints. Folders that cannot be
    read (an ancestor one may enter but not list, as /home often is) are not."""
    try:
        return (folder / LATEST_FILE).is_file() or (folder.name == CHECKPOINTS_DIR and bool(step_folders(folder)))
    except OSError:
        return False


def carry_user_files(old: Path, new: Path) -> None:
    """Copy what a user added to the export folder `old` (anything but the model's own files)
    into `new`, which replaces it; copies, so `old` stays whole until the swap."""
    if not old.is_dir():
        return
    own = HF_MODEL_FILES if is_hf_folder(old) else MODEL_FILES
    for entry in old.iterdir():
        if any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in own):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `out`; with overwrite, an existing `out` is swapped atomically
    where the OS can (elsewhere two renames, which a signal does not come between). Without, `out`
    was missing or empty when checked, and a plain rename fails where another process has filled it
    since (a second export to the same new folder): nothing is replaced unasked."""
    with signals_held():
        if not overwrite:
            try:
                os.rename(tmp, out)  # onto nothing or an empty folder only
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise FileExistsError(f"{out} was filled by another process while this export was written; "
                                      "pass --overwrite to replace it") from None
        elif out.exists() and rename_exchange(tmp, out):
            remove_tree(tmp)  # now the old folder
        else:
            old = temporary(out, old=True)
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
            remove_tree(old)
    fsync_path(out.parent)
