"""The image dataset container: a whole split decoded once into uint8 tensors; batches and subsets.

Every loader (Fashion-MNIST, CIFAR, image folders) returns an :class:`ImageDataset`
holding uint8 images (N, C, H, W) and int64 labels. :func:`iterate_batches` walks
it in a deterministic, exactly resumable order that never touches torch's global RNG.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from ...listing import counted
from ...memory import check_fits_memory
from ..batches import epoch_order, num_batches, seed_for
from ..errors import DatasetError

__all__ = ["ImageDataset", "RESIZE_RESAMPLE", "check_classification_pair", "check_same_classes", "check_split",
           "channels_problem", "convert_channels", "iterate_batches", "resize_dataset", "subset"]

_BLOCK_BYTES = 64 * 2**20  # the float copy of the images one step of a resize or of the statistics works on


@dataclass
class ImageDataset:
    """A whole image-classification split held in memory.

    ``images`` is uint8 ``(N, C, H, W)``; ``labels`` is int64 ``(N,)`` with
    values in ``[0, len(classes))``. ``contents``: what identifies the files the split was read
    from, where they can change under the same name (an image folder; see
    folder.pixel_contents), else None; subsets and resizes keep it.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    contents: str | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(
                f"{self.name}: images must be a uint8 tensor of shape (N, C, H, W), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DatasetError(
                f"{self.name}: labels must be an int64 tensor of shape (N,), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DatasetError(
                f"{self.name}: labels span [{int(self.labels.min())}, {int(self.labels.max())}] "
                f"but there are only {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Number of image channels (1 for grey, 3 for RGB)."""
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(H, W)`` of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def image_size(self) -> int:
        """Side of the (square) images; raises if they are not square."""
        height, width = self.image_shape
        if height != width:
            raise ValueError(f"{self.name}: images are {height}x{width}, not square; use image_shape")
        return height

    @cached_property
    def _moments(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return _channel_moments(self.images)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the pixels scaled to [0, 1]."""
        return self._moments[0]

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation of the pixels scaled to [0, 1]; 1 for a channel that never
        varies (constant_channels), which normalisation then centres without scaling."""
        return tuple(1.0 if i in self.constant_channels else s for i, s in enumerate(self._moments[1]))

    @property
    def constant_channels(self) -> list[int]:
        """The channels whose pixels all hold one value (std under a millionth of the range), such as
        the blue of red-and-green images."""
        return [i for i, s in enumerate(self._moments[1]) if s < 1e-6]


def check_classification_pair(train: ImageDataset, test: ImageDataset) -> None:
    """DatasetError unless a training and a test split make a classification task: at least two
    classes, the same class names in the same order (a model's output i must mean one class), and
    neither split empty."""
    for split in (train, test):
        if not len(split):
            raise DatasetError(f"{split.name}: no images")
    if train.num_classes < 2:
        raise DatasetError(f"{train.name}: only one class ({', '.join(train.classes)}); "
                           "classification needs at least two")
    check_same_classes(train.classes, test, f"{train.name}'s")


def check_same_classes(expected: list[str], dataset: ImageDataset, whose: str) -> None:
    """DatasetError unless ``dataset`` has exactly the classes ``expected`` (``whose``: where those
    come from, for the message: "the checkpoint's", "fashion-mnist-train's")."""
    if list(dataset.classes) == list(expected):
        return
    missing = [c for c in dataset.classes if c not in expected]
    absent = [c for c in expected if c not in dataset.classes]
    detail = (f"{', '.join(missing)} not among {whose} classes" if missing else
              f"lacks {', '.join(absent)}" if absent else "the same names in another order")
    if sorted(unicodedata.normalize("NFC", c) for c in dataset.classes) == sorted(
            unicodedata.normalize("NFC", c) for c in expected):
        detail += ("; the names look alike but are written with other Unicode characters (composed and "
                   "decomposed accents, as macOS and Linux copies can differ): rename the folders alike")
    raise DatasetError(f"{dataset.name}: its classes differ from {whose} ({detail}); "
                       f"{whose} classes: {', '.join(expected)}")


def _block(image_elements: int, element_bytes: int) -> int:
    """How many images to convert at a time: a working copy of at most _BLOCK_BYTES (and 4096 images)."""
    return max(1, min(4096, _BLOCK_BYTES // (element_bytes * max(image_elements, 1))))


def _channel_moments(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, in float64 chunks."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    chunk = _block(images[0].numel() if len(images) else 1, 8)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].to(torch.float64) / 255.0
        total += block.sum(dim=(0, 2, 3)).cpu()
        total_sq += block.square().sum(dim=(0, 2, 3)).cpu()
    count = max(images.numel() // max(channels, 1), 1)
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


RESIZE_RESAMPLE = "bilinear"  # resize_dataset's, as Pillow names it (its filter gives the same pixels, to rounding)


def channels_problem(channels: Any) -> str | None:
    """Why a model of ``channels`` cannot be given images (they are read as grey or RGB), or None."""
    return None if channels in (1, 3) else (f"the model takes {channels}-channel images, and images are read as "
                                            "grey (1) or RGB (3)")


# Pillow's conversion of RGB to grey ("L"): L = (19595 R + 38470 G + 7471 B + 2**15) >> 16, the ITU-R 601
# luma weights 0.299, 0.587, 0.114 in 16-bit fixed point, so a converted dataset equals a folder of its images.
_LUMA_16 = (19595, 38470, 7471)


def convert_channels(dataset: ImageDataset, channels: int) -> ImageDataset:
    """The dataset with ``channels`` (1: grey, 3: RGB) as Pillow converts images: grey repeated
    into R, G and B, or RGB to grey by its luma."""
    if {channels, dataset.channels} - {1, 3}:
        raise ValueError(f"{dataset.name}: images are converted between grey (1 channel) and RGB (3), not from "
                         f"{counted(dataset.channels, 'channel')} to {channels}")
    if channels == dataset.channels:
        return dataset
    plane = dataset.images[0, 0].numel() if len(dataset) else 0  # pixels of one channel of one image
    check_fits_memory(len(dataset) * channels * plane,
                      f"the images of {dataset.name} converted to {'RGB' if channels == 3 else 'grey'}")
    if channels == 3:
        images = dataset.images.expand(-1, 3, -1, -1).contiguous()
    else:  # in blocks: the int32 sums take four bytes a pixel
        weights = torch.tensor(_LUMA_16, dtype=torch.int32).view(1, 3, 1, 1)
        images = torch.cat([(((block.to(torch.int32) * weights).sum(1, keepdim=True) + 2**15) >> 16).to(torch.uint8)
                            for block in dataset.images.split(_block(3 * plane, 4))])
    return ImageDataset(images, dataset.labels, list(dataset.classes), dataset.name, dataset.contents)


def resize_dataset(dataset: ImageDataset, image_size: int) -> ImageDataset:
    """Resize every image to ``image_size`` squared (bilinear, antialiased), once."""
    if dataset.image_shape == (image_size, image_size):
        return dataset
    per_image = dataset.channels * image_size**2  # bytes of one resized uint8 image
    source = dataset.images[0].numel() if len(dataset) else 0  # elements of one image before
    step = _block(max(per_image, source), 4)  # images resized at a time, in float32
    check_fits_memory(len(dataset) * per_image + 2 * 4 * step * max(per_image, source),
                      f"the images of {dataset.name} resized to {image_size}px")
    chunks = []
    for start in range(0, len(dataset), step):
        block = dataset.images[start : start + step]
        grey = _grey_as_rgb(block)  # resized as one channel, then repeated: the same pixels, a third of the work
        resized = F.interpolate((block[:, :1] if grey else block).float(), size=(image_size, image_size),
                                mode="bilinear", antialias=True).round_().clamp_(0, 255).to(torch.uint8)
        chunks.append(resized.expand(-1, 3, -1, -1) if grey else resized)
    images = torch.cat(chunks) if chunks else dataset.images.new_zeros((0, dataset.channels, image_size, image_size))
    return ImageDataset(images, dataset.labels, list(dataset.classes), dataset.name, dataset.contents)


def _grey_as_rgb(images: torch.Tensor) -> bool:
    """Whether RGB images (N, 3, H, W) hold one grey image three times (convert_channels' from grey)."""
    return (images.shape[1] == 3 and torch.equal(images[:, 0], images[:, 1])
            and torch.equal(images[:, 0], images[:, 2]))


def iterate_batches(
    dataset: ImageDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(uint8 images (B, C, H, W), int64 labels (B,))`` for one epoch.

    The order depends only on (seed, epoch), so resuming with ``start_batch=k``
    yields exactly the batches k, k+1, ... of an uninterrupted epoch.
    """
    total = num_batches(len(dataset), batch_size, drop_last)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must be in [0, {total}], got {start_batch}")
    order = epoch_order(len(dataset), seed, epoch) if shuffle else torch.arange(len(dataset))
    for index in range(start_batch, total):
        chunk = order[index * batch_size : (index + 1) * batch_size]
        yield dataset.images[chunk], dataset.labels[chunk]


def subset(dataset: ImageDataset, n: int, seed: int = 0) -> ImageDataset:
    """The first ``n`` examples of a seeded permutation (all of them if n >= len)."""
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    generator = torch.Generator().manual_seed(seed_for(seed, -1))
    chosen = torch.randperm(len(dataset), generator=generator)[:n]
    return ImageDataset(dataset.images[chosen], dataset.labels[chosen], list(dataset.classes), dataset.name,
                        dataset.contents)
