"""Fashion-MNIST: from a folder, Debian's dataset-fashion-mnist package, the user cache, or a
checksum-verified download."""

from __future__ import annotations

import contextlib
import urllib.error
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..downloads import data_home, download_file
from ..errors import DatasetError, DatasetNotFoundError, PathLike
from .dataset import ImageDataset, check_split
from .idx import read_idx

__all__ = ["DEBIAN_FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "load_fashion_mnist"]


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# split -> (images file, labels file)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# SHA-256 of the canonical zalandoresearch .gz files (the ones whose MD5s are
# published upstream: 8d4fb7e6..., 25c81989..., bef4ecab..., bb300cfd...).
#
# How they were obtained without network access: Debian's package
# dataset-fashion-mnist (0.0~git20200523.55506a9-1) ships the same files, but
# NOT byte-identical: its build ran strip-nondeterminism, which rewrote only the
# 10-byte gzip header (FNAME flag and original file name removed, mtime reset),
# so each Debian file is 23-24 bytes shorter. The deflate stream and the
# CRC32/size trailer are untouched. Re-adding the header fields (FNAME =
# original name, mtime 1504176606 for the train files and 1504176627 for the
# t10k files, XFL 0, OS 3) reproduces files of the canonical sizes whose MD5s
# equal all four upstream MD5s; the constants below are the SHA-256 of those
# reconstructed files. The decompressed IDX payloads are identical either way.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}

# SHA-256 of the (header-normalised) files as installed by the Debian package,
# for reference: the loader validates local files structurally, not by hash.
FASHION_MNIST_DEBIAN_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}

# Where `apt-get install dataset-fashion-mnist` puts the files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")



def _find_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` or its uncompressed twin (``name`` without ``.gz``)."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _find_pair(folders: Sequence[Path], names: tuple[str, str]) -> tuple[Path, Path] | None:
    """The first folder holding both files, as their paths."""
    for folder in folders:
        found = [_find_file(folder, name) for name in names]
        if found[0] is not None and found[1] is not None:
            return found[0], found[1]
    return None


def _download_fashion_mnist(names: tuple[str, str], folder: Path) -> tuple[Path, Path]:
    paths = []
    for name in names:
        target = folder / name
        if not target.is_file():
            try:
                download_file(FASHION_MNIST_URL + name, target, FASHION_MNIST_SHA256[name])
            except (urllib.error.URLError, OSError) as exc:
                raise DatasetNotFoundError(
                    f"could not download Fashion-MNIST file {name} from {FASHION_MNIST_URL} ({exc}). "
                    + _FASHION_MNIST_HELP
                ) from exc
        paths.append(target)
    return paths[0], paths[1]


_FASHION_MNIST_HELP = (
    "To get Fashion-MNIST: on Debian/Ubuntu run `apt-get install dataset-fashion-mnist` "
    f"(installs into {DEBIAN_FASHION_MNIST_DIR}), or put the four *-ubyte(.gz) files in a folder "
    "and pass it as data_dir (--data-dir), or allow the download (download=True)."
)


def load_fashion_mnist(split: str, data_dir: PathLike | None = None, download: bool = True) -> ImageDataset:
    """Load a Fashion-MNIST split ('train' or 'test') as a 1x28x28 uint8 dataset.

    With ``data_dir``, looks only there (and in ``data_dir/fashion-mnist``) and
    downloads into it when allowed; without it, looks in Debian's install
    folder, then the user cache (``data_home()/fashion-mnist``), and downloads
    into the cache when ``download`` is true.
    """
    check_split(split)
    names = FASHION_MNIST_FILES[split]
    cache = data_home() / "fashion-mnist"
    if data_dir is not None:  # an explicit folder is authoritative: no silent fallback
        folders = [Path(data_dir), Path(data_dir) / "fashion-mnist"]
        cache = Path(data_dir)
    else:
        folders = [DEBIAN_FASHION_MNIST_DIR, cache]
    found = _find_pair(folders, names)
    if found is None:
        if not download:
            searched = ", ".join(str(folder) for folder in folders)
            raise DatasetNotFoundError(
                f"Fashion-MNIST {split} files {names[0]} / {names[1]} not found in: {searched}. " + _FASHION_MNIST_HELP
            )
        created = not cache.exists()
        try:
            found = _download_fashion_mnist(names, cache)
        except DatasetNotFoundError as err:
            if created:  # nothing came: no empty folder left behind
                with contextlib.suppress(OSError):
                    cache.rmdir()
            if data_dir is None:
                raise
            raise DatasetNotFoundError(_only_there(str(err), data_dir, names)) from err.__cause__
    return _fashion_mnist_from_files(*found, split=split)


def _only_there(message: str, data_dir: PathLike, names: tuple[str, str]) -> str:
    """A failed download's message for an explicit folder: it was the only place looked in, and
    where the files are when Debian's package holds them (then installing it is no advice)."""
    if _find_pair([DEBIAN_FASHION_MNIST_DIR], names) is None:
        return f"{message} With --data-dir only {data_dir} is searched."
    return (f"{message.removesuffix(_FASHION_MNIST_HELP).rstrip()} With --data-dir only {data_dir} is searched; "
            f"the files are in {DEBIAN_FASHION_MNIST_DIR}: pass that folder, or leave --data-dir out.")


def _fashion_mnist_from_files(images_path: Path, labels_path: Path, split: str) -> ImageDataset:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(
            f"{labels_path}: expected {len(images)} labels to match {images_path.name}, got shape {labels.shape}"
        )
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(f"{labels_path}: label {int(labels.max())} is out of range 0..9")
    return ImageDataset(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(FASHION_MNIST_CLASSES),
        name=f"fashion-mnist-{split}",
    )
