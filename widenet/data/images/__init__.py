"""Image classification datasets, decoded once into uint8 tensors.

Sources: Fashion-MNIST (fashion_mnist.py), CIFAR-10/100 (cifar.py), a folder of
images (folder.py); the container, batches and subsets in dataset.py.
"""

from __future__ import annotations

from typing import Any

from ..downloads import data_home
from ..errors import DatasetError, DatasetNotFoundError, PathLike
from .cifar import CIFAR10_CLASSES, load_cifar
from .dataset import (RESIZE_RESAMPLE, ImageDataset, channels_problem, check_classification_pair,
                      check_same_classes, convert_channels, iterate_batches, resize_dataset, subset)
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from .folder import TEST_SPLIT_FOLDERS, load_image_folder
from .idx import read_idx

__all__ = ["CIFAR10_CLASSES", "DATASET_NAMES", "RESIZE_RESAMPLE", "DatasetError", "DatasetNotFoundError",
           "FASHION_MNIST_CLASSES", "ImageDataset", "channels_problem", "check_classification_pair",
           "check_same_classes", "convert_channels", "iterate_batches", "load_cifar", "load_dataset",
           "load_fashion_mnist", "load_image_folder", "read_idx", "resize_dataset", "subset", "TEST_SPLIT_FOLDERS"]

DATASET_NAMES = ("fashion-mnist", "cifar10", "cifar100", "folder")


def load_dataset(
    name: str,
    split: str,
    data_dir: PathLike | None = None,
    image_size: int | None = None,
    download: bool = True,
    channels: int | None = None,
    resize: dict[str, Any] | None = None,
) -> ImageDataset:
    """Load a dataset by name: 'fashion-mnist', 'cifar10', 'cifar100' or 'folder'.

    ``image_size`` resizes the images once at load time (required for
    'folder', whose images are decoded at that size; `widenet train` and
    `widenet eval` pass the model's). CIFAR is read from ``data_dir`` or, if
    not given, from ``data_home()``; 'folder' needs ``data_dir``, and reads
    its "test" split from ``test/``, ``val/`` or ``validation/``, the first
    that exists (folder.TEST_SPLIT_FOLDERS), decoding every image to
    ``channels`` (1: grey, 3: RGB, the default) the way ``resize`` says
    (folder.load_image_folder). The other datasets are converted to ``channels``
    as Pillow converts (convert_channels: a model trained on one reads the other), or keep
    their own when it is None, and are resized by resize_dataset.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if name == "folder":
        if data_dir is None:
            raise ValueError("dataset 'folder' needs data_dir (--data-dir: the folder holding <split>/<class>/<image>)")
        if image_size is None:
            raise ValueError("dataset 'folder' needs image_size (the size its images are decoded at)")
        return load_image_folder(data_dir, split, image_size, 3 if channels is None else channels, resize=resize)
    if name == "fashion-mnist":
        dataset = load_fashion_mnist(split, data_dir=data_dir, download=download)
    else:
        dataset = load_cifar(data_dir if data_dir is not None else data_home(), variant=name, split=split)
    dataset = convert_channels(dataset, channels) if channels is not None else dataset
    return resize_dataset(dataset, image_size) if image_size is not None else dataset
