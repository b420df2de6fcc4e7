"""A folder of images laid out as root/<split>/<class>/<image>: decoded with Pillow once and cached
as a tensor file (invalidated when the files, the size or the decoding change).

The held-out split may be named as datasets ship it: asked for "test", the
loader takes ``root/test``, else ``root/val`` (ImageNet's layout), else
``root/validation`` (TEST_SPLIT_FOLDERS, in that order).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...files import file_stamp, load_cache, save_cache
from ...listing import counted, listed
from ...memory import check_fits_memory
from ...runtime import first_line
from ..errors import DatasetError, DatasetNotFoundError, PathLike
from .dataset import ImageDataset

__all__ = ["IMAGE_EXAMPLES", "IMAGE_SUFFIXES", "TEST_SPLIT_FOLDERS", "decode_image", "folder_files",
           "load_image_folder", "split_folder"]

# The folders that hold the "test" split, in order of preference: the first that exists is used.
TEST_SPLIT_FOLDERS = ("test", "val", "validation")
# The raster formats Pillow reads, by extension (any case): what folders are searched for.
IMAGE_SUFFIXES = (".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff",
                  ".pgm", ".ppm", ".pbm", ".pnm", ".tga", ".ico", ".pcx", ".sgi", ".ras", ".qoi", ".jp2", ".j2k")
IMAGE_EXAMPLES = ".png .jpg .jpeg .bmp .gif .webp .tif .pgm ..."  # IMAGE_SUFFIXES in a message
# Formats (Pillow's names; PPM covers PGM too) that hold at most 16 bits even where Pillow says mode "I".
_SIXTEEN_BIT_AT_MOST = ("PNG", "PPM")


def folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, everything else) under `folder`, recursively, sorted, hidden files and folders
    skipped; linked folders are followed, each real folder once, except a link back up to `folder`
    or above it (a loop); images are regular files told by their extension (IMAGE_SUFFIXES, any
    case). Everything else: other files, and entries that are no regular file (a broken link, a
    pipe, a link back up)."""
    found, seen, root = [], set(), os.path.realpath(folder)
    for top, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen or (real != root and (root + os.sep).startswith(real + os.sep)):
            found.append(Path(top))  # a second link to one folder, or a loop
            folders[:] = []
            continue
        seen.add(real)  # real folders before links, so which path to a folder counts does not depend on readdir
        folders[:] = sorted((name for name in folders if not name.startswith(".")),
                            key=lambda name: (os.path.islink(os.path.join(top, name)), name))
        found += [Path(top, name) for name in names if not name.startswith(".")]
    images = [path for path in found if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
    return sorted(images), sorted(set(found) - set(images))


# Bump when the decoding below changes, so stale caches are not reused.
# 2: the central square resized (not resized, then cropped); 3: EXIF orientation applied;
# 4: keyed by change times too (a file replaced with one of the same size and mtime), pixels hashed.
_FOLDER_CACHE_VERSION = 4


def _visible(path: Path) -> bool:
    """False for hidden files and folders (such as the cache folder)."""
    return not path.name.startswith(".")


def split_folder(root: PathLike, split: str | None) -> Path:
    """The folder holding ``split`` under ``root``: ``root`` itself for None, ``root/<split>`` for a
    named split, and for "test" the first of ``root/test``, ``root/val``, ``root/validation`` that
    exists (TEST_SPLIT_FOLDERS). A missing root or test split raises DatasetNotFoundError naming
    what was looked for."""
    root = Path(root)
    if not split:
        return root
    _check_is_folder(root)
    holds = sorted(p.name + "/" for p in root.iterdir() if p.is_dir() and _visible(p))
    holding = f" (it holds {listed(holds)})" if holds else ""
    if split != "test":
        if not (root / split).is_dir():
            layout = f"{split}/<class>/<image>" + (" and test/<class>/<image>" if split == "train" else "")
            raise DatasetNotFoundError(f"image folder {root} has no {split}/{holding}; the folder to pass holds "
                                       f"{layout}")
        return root / split
    for name in TEST_SPLIT_FOLDERS:
        if (root / name).is_dir():
            return root / name
    looked = ", ".join(f"{name}/" for name in TEST_SPLIT_FOLDERS)
    raise DatasetNotFoundError(f"image folder {root} has no test split{holding}: looked for {looked} "
                               f"(each holding <class>/<image>)")


def _check_is_folder(path: Path) -> None:
    if not path.is_dir():
        raise DatasetNotFoundError(f"image folder {path} " + ("is a file, not a folder" if path.exists() else
                                                              "does not exist"))


def _scan_folder(base: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, class index) pairs of ``base/<class>/...``, sorted."""
    _check_is_folder(base)
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DatasetError(f"{base}: no class folders found (expected {base}/<class>/<image>)")
    files, others = [], []
    for index, name in enumerate(classes):
        images, skipped = folder_files(base / name)
        others += skipped
        if not images:
            kind = (f"{counted(len(skipped), 'file')} without an image extension" if all(map(Path.is_file, skipped))
                    else counted(len(skipped), "non-image file"))
            what = f"only {kind}, e.g. {skipped[0].name}" if skipped else "nothing"
            raise DatasetError(f"{base / name}: class folder holds no images ({what}; images are read by extension: "
                               f"{IMAGE_EXAMPLES}); add some or remove the folder, which would "
                               "otherwise be a class never seen")
        files += [(path, index) for path in images]
    unread = [path for path in others if not path.is_file()]  # a broken link, a pipe
    plain = [path for path in others if path.is_file()]
    loose = sorted(path for path in base.iterdir() if _visible(path) and not path.is_dir()
                   and path.suffix.lower() in IMAGE_SUFFIXES)
    reasons = ((plain, "file", "without an image extension"),
               (unread, "non-regular file", "(broken links, pipes, second links to a folder read already)"),
               (loose, "file", f"outside the class folders (each class is a folder: {base}/<class>/<image>)"))
    for skipped, noun, why in reasons:
        if skipped:
            warnings.warn(f"{base}: skipped {counted(len(skipped), noun)} {why}, e.g. {skipped[0]}", stacklevel=3)
    return classes, files


def _folder_cache_key(base: Path, files: list[tuple[Path, int]], image_size: int, channels: int,
                      resize: dict[str, Any] | None = None) -> str:
    """Hash of the file list with each file's label and stamp (files.file_stamp: size, modification and
    change times), plus the decoding settings."""
    entries = [[path.relative_to(base).as_posix(), label, *file_stamp(path)] for path, label in files]
    settings = {"v": _FOLDER_CACHE_VERSION, "files": entries, "size": image_size, "channels": channels}
    if resize is not None:  # widenet's own decoding keeps the keys it always had
        settings["resize"] = resize
    blob = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


RESAMPLING = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # Pillow's filters, by their codes


_GREY_MODES = ("1", "L", "LA")  # Pillow's grey modes (16-bit grey is made "L" first): "RGB" repeats the grey


def decode_image(path: Path, image_size: int, channels: int, crop: bool = True,
                 resample: str = "bicubic") -> torch.Tensor:
    """Decode one file to uint8 (C, S, S): turned upright as its EXIF Orientation tag says (as viewers
    show it), the central square (side = the shorter side) cut out, then resized to S x S (bicubic), so
    memory stays bounded whatever the aspect ratio. 16-bit grey images are scaled to 8 bits (full 16-bit
    range assumed); floating-point and 32-bit integer images are refused (their range is unknown).
    crop=False resizes the whole image to S x S instead (squashed, as Hugging Face's ViT processor
    does); resample: one of RESAMPLING."""
    from PIL import Image

    _quiet_pillow_notes()
    try:
        with Image.open(path) as image:
            pixels, limit = image.width * image.height, Image.MAX_IMAGE_PIXELS
            if limit and pixels > limit:  # Pillow's own note names no file
                warnings.warn(f"{path}: {image.width}x{image.height} pixels, above Pillow's limit of {limit} "
                              "(its guard against decompression bombs); decoded anyway",
                              Image.DecompressionBombWarning, stacklevel=2)
            image.load()
            image = _upright(image)
            # Mode "I" is 32-bit integers, except from PNG and PNM files, which hold at most 16 bits
            # (Pillow opens 16-bit PGM, and 16-bit PNG before 10.3, as "I").
            if image.mode == "F" or (image.mode == "I" and image.format not in _SIXTEEN_BIT_AT_MOST):
                kind = "floating-point" if image.mode == "F" else "32-bit integer"
                raise DatasetError(f"{path}: {kind} pixels are not supported (their range is unknown); save the "
                                   "image with 8 or 16 bits")
            if image.mode.startswith("I"):  # 16-bit grey: to 8 bits
                wide = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255)
                image = Image.fromarray(wide.round().astype(np.uint8), "L")
            # A grey image stays grey through the crop and the resize and is made RGB after them: the
            # same pixels as converting first (Pillow filters each band alike), a third of the work.
            image = image.convert("L" if channels == 1 or image.mode in _GREY_MODES else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{path}: Pillow cannot read this image ({exc})") from exc
    if crop:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    image = image.resize((image_size, image_size), Image.Resampling(RESAMPLING.index(resample)))
    image = image.convert("RGB") if channels == 3 and image.mode == "L" else image
    array = np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _quiet_pillow_notes() -> None:
    """Silence the notes Pillow writes without naming the file: a very large image (decode_image
    writes its own, with the path) and a damaged EXIF tag (the image decodes; the tag is taken as
    absent). Filters on Pillow's modules, added where missing (a caller may reset the filters), not
    warnings.catch_warnings: that swaps the process's warning hooks, and predict decodes on several
    threads, whose swaps could leave every later warning lost."""
    from PIL import Image

    for category, module in ((Image.DecompressionBombWarning, r"PIL\."), (UserWarning, r"PIL\.TiffImagePlugin")):
        if not any(f[0] == "ignore" and f[2] is category and f[3] is not None and f[3].pattern == module
                   for f in warnings.filters):
            warnings.filterwarnings("ignore", category=category, module=module)


# EXIF orientation (1-8) -> the Pillow transpose that turns the stored pixels upright (1: none).
_ORIENTATION_TURNS = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                      7: "TRANSVERSE", 8: "ROTATE_90"}


def _upright(image):
    """The image turned as its EXIF Orientation tag says (a phone photo is stored as the sensor saw it).
    Only the tag is read, and a damaged EXIF block counts as no tag: Pillow's exif_transpose also
    rewrote the block and raised on some damaged ones (TypeError, struct.error) that decode fine."""
    from PIL import Image

    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - any damage in the EXIF block: the pixels stay as stored
        return image
    turn = _ORIENTATION_TURNS.get(orientation) if isinstance(orientation, int) else None
    return image.transpose(getattr(Image.Transpose, turn)) if turn else image


def _load_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The cached tensors if ``path`` holds a valid cache for ``key``, else None."""
    if not path.is_file():
        return None
    try:
        cached = load_cache(path)
    except Exception as exc:  # a damaged cache is rebuilt, not fatal
        warnings.warn(f"ignoring unreadable image cache {path} ({first_line(exc)}); rebuilding it", stacklevel=3)
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    return cached


def load_image_folder(
    root: PathLike,
    split: str | None,
    image_size: int,
    channels: int = 3,
    cache_dir: PathLike | None = None,
    resize: dict[str, Any] | None = None,
) -> ImageDataset:
    """Load ``root/<split>/<class>/<image>`` (or ``root/<class>/...`` if split is None).

    The split "test" is read from ``root/test``, else ``root/val``, else
    ``root/validation`` (the first that exists; see split_folder); any other
    split from ``root/<split>``.

    Every file with an image extension (IMAGE_SUFFIXES) is converted to ``channels`` (1 or 3), its
    central square cut out and resized to ``image_size`` (bicubic); ``resize`` ({"crop": bool,
    "resample": one of RESAMPLING}, decode_image's) decodes another way, as a model's recorded
    resize says. The decoded tensor is cached once in ``cache_dir`` (default
    ``root/.widenet-cache``, where an entry replaced for a changed folder is removed), keyed by the
    file list, sizes, modification and change times and the settings, and reused by later loads
    without opening the images. The dataset's ``contents`` identifies the images (pixel_contents).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    root = Path(root)
    base = split_folder(root, split)
    folder = base.name if split else None  # "val" when the test split lives in root/val
    classes, files = _scan_folder(base)
    key = _folder_cache_key(base, files, image_size, channels, resize)
    cache_folder = Path(cache_dir) if cache_dir is not None else root / ".widenet-cache"
    way = "" if resize is None else f"-{'crop' if resize['crop'] else 'squash'}-{resize['resample']}"
    prefix = f"{folder or 'all'}-{image_size}px{way}-{channels}ch-"
    cache_path = cache_folder / f"{prefix}{key[:16]}.pt"
    name = f"folder-{root.name}" + (f"-{folder}" if folder else "")
    cached = _load_cache(cache_path, key)
    if cached is not None:
        contents = cached.get("contents") or pixel_contents(cached["images"], cached["labels"])
        return ImageDataset(cached["images"], cached["labels"], list(cached["classes"]), name, contents)
    check_fits_memory(len(files) * channels * image_size**2,
                      f"the {len(files)} images of {base} decoded at {image_size} px")
    images = torch.empty((len(files), channels, image_size, image_size), dtype=torch.uint8)
    for i, (path, _) in enumerate(files):
        images[i] = decode_image(path, image_size, channels, **(resize or {}))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    contents = pixel_contents(images, labels)
    try:
        save_cache({"key": key, "images": images, "labels": labels, "classes": classes, "contents": contents},
                   cache_path)
    except OSError as exc:
        warnings.warn(f"could not write image cache {cache_path} ({exc}); continuing without it", stacklevel=2)
    else:
        if cache_dir is None:  # the folder's own cache: its older entries for these settings describe files gone
            for stale in cache_folder.glob(f"{glob.escape(prefix)}*.pt"):
                if stale != cache_path:
                    with contextlib.suppress(OSError):  # best effort (another user's file, an immutable one)
                        stale.unlink(missing_ok=True)
    return ImageDataset(images, labels, classes, name, contents)


def pixel_contents(images: torch.Tensor, labels: torch.Tensor) -> str:
    """What a resumed run compares to know its training images are the ones it started on: their
    number and a hash of the decoded pixels and labels, in order (a file added, removed, renamed or
    replaced changes it; a folder copied or moved elsewhere, with --data-dir, does not)."""
    digest = hashlib.sha256(images.contiguous().numpy())
    digest.update(labels.contiguous().numpy())
    return f"{len(labels)} images, pixels {digest.hexdigest()[:12]}"
