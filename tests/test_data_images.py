"""Tests for widenet.data.images: IDX/Fashion-MNIST, CIFAR, image folders, batching."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import damage_in_place
from PIL import Image

from widenet.data.batches import epoch_order, num_batches
from widenet.data.downloads import data_home
from widenet.data.images import cifar, fashion_mnist
from widenet.data.images import (
    DatasetError,
    DatasetNotFoundError,
    ImageDataset,
    convert_channels,
    iterate_batches,
    load_cifar,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
    resize_dataset,
    subset,
)
from widenet.data.images.folder import folder_files

# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """Fail any real download; keep the cache and the Debian folder inside tmp_path."""

    def refuse(*args, **kwargs):
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("WIDENET_DATA_HOME", str(tmp_path / "data-home"))


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Pretend Debian's dataset-fashion-mnist package is not installed."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in IDX format."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_fashion(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_fashion(folder: Path, gz: bool = True, n_train: int = 12, n_test: int = 5) -> dict[str, bytes]:
    """Write the four Fashion-MNIST files; return {canonical name: .gz bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = fake_fashion(n, seed=n)
        for name, array in zip(fashion_mnist.FASHION_MNIST_FILES[split], (images, labels), strict=True):
            raw = idx_bytes(array)
            blobs[name] = gzip.compress(raw)
            if gz:
                (folder / name).write_bytes(blobs[name])
            else:
                (folder / name.removesuffix(".gz")).write_bytes(raw)
    return blobs


# --------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------


def test_read_idx_raw_and_gz(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(array))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx.gz"), array)


def test_read_idx_big_endian_int32(tmp_path):
    array = np.array([1, -2, 70000], dtype=">i4")
    path = tmp_path / "b.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + array.tobytes())
    out = read_idx(path)
    assert out.dtype == np.int32 and out.tolist() == [1, -2, 70000]


@pytest.mark.parametrize(
    "name, payload, message",
    [
        ("truncated.idx", idx_bytes(np.zeros((4, 5), np.uint8))[:-3], "truncated"),
        ("trailing.idx", idx_bytes(np.zeros((4, 5), np.uint8)) + b"xx", "trailing"),
        ("magic.idx", b"\x01\x02\x08\x02" + idx_bytes(np.zeros((4, 5), np.uint8))[4:], "magic"),
        ("header.idx", b"\x00\x00\x08\x03\x00\x00", "header"),
        ("tiny.idx", b"\x00", "too short"),
        ("notgzip.idx.gz", idx_bytes(np.zeros((4, 5), np.uint8)), "gzip"),
        ("cut.idx.gz", gzip.compress(idx_bytes(np.zeros((40, 50), np.uint8)), mtime=0)[:-20], "gzip"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, name, payload, message):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(DatasetError, match=message) as info:
        read_idx(path)
    assert name in str(info.value)


def test_read_idx_corrupt_gzip_crc(tmp_path):
    blob = bytearray(gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8))))
    blob[-6] ^= 0xFF  # damage the CRC32 in the trailer
    path = tmp_path / "crc.idx.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DatasetError, match="crc.idx.gz"):
        read_idx(path)


# --------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_data_dir(tmp_path, no_debian, gz):
    write_fashion(tmp_path / "fm", gz=gz)
    train = load_fashion_mnist("train", data_dir=tmp_path / "fm", download=False)
    test = load_fashion_mnist("test", data_dir=tmp_path / "fm", download=False)
    images, labels = fake_fashion(12, seed=12)
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert torch.equal(train.images[:, 0], torch.from_numpy(images))
    assert torch.equal(train.labels, torch.from_numpy(labels.astype(np.int64)))
    assert len(test) == 5 and test.num_classes == 10 and test.channels == 1 and test.image_size == 28
    assert train.classes[0] == "T-shirt/top" and train.classes[-1] == "Ankle boot"


def test_fashion_mnist_subfolder_of_data_dir(tmp_path, no_debian):
    write_fashion(tmp_path / "root" / "fashion-mnist")
    assert len(load_fashion_mnist("test", data_dir=tmp_path / "root", download=False)) == 5


def test_fashion_mnist_missing_explains_how_to_get_it(tmp_path, no_debian):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist("train", data_dir=tmp_path / "empty", download=False)
    assert "--data-dir" in str(info.value)


def test_fashion_mnist_bad_split():
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid", download=False)


def test_fashion_mnist_label_count_mismatch(tmp_path, no_debian):
    folder = tmp_path / "fm"
    write_fashion(folder)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(DatasetError, match="train-labels"):
        load_fashion_mnist("train", data_dir=folder, download=False)


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve(monkeypatch, blobs: dict[str, bytes], calls: list[str]) -> None:
    def urlopen(url, timeout=None):
        calls.append(url)
        return FakeResponse(blobs[url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_fashion_mnist_download_verifies_and_caches(tmp_path, monkeypatch, no_debian):
    blobs = write_fashion(tmp_path / "source")
    for name, blob in blobs.items():
        monkeypatch.setitem(fashion_mnist.FASHION_MNIST_SHA256, name, hashlib.sha256(blob).hexdigest())
    calls: list[str] = []
    serve(monkeypatch, blobs, calls)
    train = load_fashion_mnist("train", download=True)
    assert len(train) == 12
    cache = tmp_path / "data-home" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert all(url.startswith(fashion_mnist.FASHION_MNIST_URL) for url in calls) and len(calls) == 2
    load_fashion_mnist("train", download=True)  # cached: no new requests
    assert len(calls) == 2


def test_fashion_mnist_download_checksum_mismatch(tmp_path, monkeypatch, no_debian):
    blobs = write_fashion(tmp_path / "source")
    serve(monkeypatch, blobs, [])  # the real constants do not match these fake files
    with pytest.raises(DatasetError, match="checksum mismatch"):
        load_fashion_mnist("test", download=True)
    cache = tmp_path / "data-home" / "fashion-mnist"
    assert list(cache.iterdir()) == []  # temp file removed, nothing renamed into place


def test_fashion_mnist_download_network_error(monkeypatch, no_debian):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError, match="could not download"):
        load_fashion_mnist("test", download=True)


def test_a_given_data_dir_without_the_files_says_it_was_the_only_place_looked_in(tmp_path, monkeypatch, no_debian):
    """--data-dir naming a missing folder: the download into it failed, the message advised installing
    the Debian package that was installed, and an empty folder was left behind."""
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    missing = tmp_path / "typo"
    with pytest.raises(DatasetNotFoundError, match=rf"With --data-dir only {missing} is searched\.$") as err:
        load_fashion_mnist("test", data_dir=missing)
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and not missing.exists()
    write_fashion(fashion_mnist.DEBIAN_FASHION_MNIST_DIR)
    with pytest.raises(DatasetNotFoundError, match=rf"only {missing} is searched; the files are in "
                                                   rf"{fashion_mnist.DEBIAN_FASHION_MNIST_DIR}: pass that folder"
                       ) as err:
        load_fashion_mnist("test", data_dir=missing)
    assert "apt-get" not in str(err.value) and not missing.exists()
    missing.mkdir()  # the user's own (empty) folder: kept
    with pytest.raises(DatasetNotFoundError):
        load_fashion_mnist("test", data_dir=missing)
    assert missing.is_dir()


def test_data_home_default(monkeypatch):
    monkeypatch.delenv("WIDENET_DATA_HOME")
    assert data_home() == Path.home() / ".cache" / "widenet"


debian = pytest.mark.skipif(
    not (fashion_mnist.DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)


@debian
def test_debian_fashion_mnist_loads():
    train = load_fashion_mnist("train", download=False)
    test = load_fashion_mnist("test", download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.unique().tolist() == list(range(10))
    assert test.labels.unique().tolist() == list(range(10))
    assert train.mean[0] == pytest.approx(0.2860, abs=1e-3) and train.std[0] == pytest.approx(0.3530, abs=1e-3)


@debian
def test_debian_files_rebuild_the_canonical_gz_files():
    """Debian only rewrote the gzip headers: restoring them gives the canonical SHA-256s."""
    mtimes = {"train": 1504176606, "t10k": 1504176627}
    for name, expected in fashion_mnist.FASHION_MNIST_SHA256.items():
        data = (fashion_mnist.DEBIAN_FASHION_MNIST_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == fashion_mnist.FASHION_MNIST_DEBIAN_SHA256[name]
        header = b"\x1f\x8b\x08\x08" + struct.pack("<I", mtimes[name.split("-")[0]]) + data[8:10]
        canonical = header + name.removesuffix(".gz").encode() + b"\0" + data[10:]
        assert hashlib.sha256(canonical).hexdigest() == expected


# --------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------


def cifar_batch(n: int, seed: int, label_key, bytes_keys: bool) -> dict:
    rng = np.random.default_rng(seed)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    batch = {
        key("data"): rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        key(label_key): rng.integers(0, 10, n).tolist(),
    }
    if label_key == "fine_labels":
        batch[key("coarse_labels")] = [0] * n
    return batch


def dump(path: Path, obj, protocol: int) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(root: Path, n: int = 3, protocol: int = 2) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump(folder / f"data_batch_{i}", cifar_batch(n, i, "labels", True), protocol)
    dump(folder / "test_batch", cifar_batch(n, 99, "labels", True), protocol)
    dump(folder / "batches.meta", {b"label_names": [c.encode() for c in cifar.CIFAR10_CLASSES]}, protocol)
    return folder


def write_cifar100(root: Path, n: int = 4) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    dump(folder / "train", cifar_batch(n, 1, "fine_labels", False), pickle.HIGHEST_PROTOCOL)
    dump(folder / "test", cifar_batch(n, 2, "fine_labels", False), pickle.HIGHEST_PROTOCOL)
    dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}, pickle.HIGHEST_PROTOCOL)
    return folder


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_layout(tmp_path, protocol):
    folder = write_cifar10(tmp_path, protocol=protocol)
    for root in (tmp_path, folder):
        train = load_cifar(root, "cifar10", "train")
        assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
        assert train.classes == cifar.CIFAR10_CLASSES and train.name == "cifar10-train"
    first = cifar_batch(3, 1, "labels", True)
    assert torch.equal(train.images[:3].reshape(3, -1), torch.from_numpy(first[b"data"]))
    assert train.labels[:3].tolist() == first[b"labels"]
    assert len(load_cifar(tmp_path, "cifar10", "test")) == 3


def test_datasets_are_converted_to_the_models_channels_as_pillow_converts(tmp_path, fmnist_dir):
    """An RGB model (a grey one exported to Hugging Face as RGB) could not be evaluated or fine-tuned
    on Fashion-MNIST, a grey one on CIFAR: the built-in datasets kept their own channels."""
    write_cifar10(tmp_path, n=4)
    colour = load_dataset("cifar10", "test", tmp_path)
    black_and_white = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 32, 32)
    extremes = ImageDataset(black_and_white.contiguous(), torch.zeros(2, dtype=torch.int64), ["a"],
                            "extremes")  # where rounding could overflow
    for dataset, grey in ((colour, load_dataset("cifar10", "test", tmp_path, channels=1)),
                          (extremes, convert_channels(extremes, 1))):
        pillow = [Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").convert("L") for image in dataset.images]
        assert grey.images.shape == (len(dataset), 1, 32, 32)
        assert np.array_equal(grey.images[:, 0].numpy(), np.stack([np.asarray(image) for image in pillow]))
        assert torch.equal(grey.labels, dataset.labels) and grey.classes == dataset.classes
    own = load_dataset("fashion-mnist", "test", fmnist_dir)
    pillow = [np.asarray(Image.fromarray(image[0].numpy(), "L").convert("RGB")) for image in own.images]
    assert torch.equal(load_dataset("fashion-mnist", "test", fmnist_dir, channels=3).images.permute(0, 2, 3, 1),
                       torch.from_numpy(np.stack(pillow)))
    resized = load_dataset("fashion-mnist", "test", fmnist_dir, channels=3, image_size=20).images
    assert torch.equal(resized, resize_dataset(own, 20).images.expand(-1, 3, -1, -1))
    for channels in (2, 0):  # (a folder's 0 was read as RGB)
        for name in ("fashion-mnist", "folder"):
            with pytest.raises(ValueError, match=f"channels must be 1 \\(grey\\) or 3 \\(RGB\\), got {channels}"):
                load_dataset(name, "test", fmnist_dir, image_size=28, channels=channels)
    with pytest.raises(ValueError, match="converted between grey .1 channel. and RGB .3., not from 1 channel to 2$"):
        convert_channels(own, 2)


def test_cifar100_layout_uses_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    test = load_cifar(tmp_path, "cifar100", "test")
    assert test.images.shape == (4, 3, 32, 32) and test.num_classes == 100
    assert test.labels.tolist() == cifar_batch(4, 2, "fine_labels", False)["fine_labels"]
    assert test.classes[3] == "c3"


def py2_str(text: bytes) -> bytes:
    """Pickle opcodes for a Python-2 ``str`` (SHORT_BINSTRING or BINSTRING)."""
    if len(text) < 256:
        return b"U" + bytes([len(text)]) + text
    return b"T" + struct.pack("<i", len(text)) + text


def py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way Python 2 + numpy wrote the real CIFAR files (protocol 2)."""
    dtype = (
        b"cnumpy\ndtype\n" + py2_str(b"u1") + b"K\x00K\x01\x87R"
        b"(K\x03" + py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    shape = b"(" + b"".join(b"J" + struct.pack("<i", d) for d in data.shape) + b"t"
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + py2_str(b"b") + b"\x87R"
        b"(K\x01" + shape + dtype + b"\x89" + py2_str(data.tobytes()) + b"tb"
    )
    label_ops = b"".join(b"K" + bytes([label]) for label in labels)
    return b"\x80\x02}(" + py2_str(b"data") + array + py2_str(b"labels") + b"](" + label_ops + b"eu."


def test_cifar_python2_pickle(tmp_path):
    folder = write_cifar10(tmp_path)
    data = np.arange(2 * 3072, dtype=np.uint32).astype(np.uint8).reshape(2, 3072)
    (folder / "test_batch").write_bytes(py2_cifar_pickle(data, [3, 7]))
    test = load_cifar(folder, "cifar10", "test")
    assert torch.equal(test.images.reshape(2, -1), torch.from_numpy(data))
    assert test.labels.tolist() == [3, 7]


def test_cifar_corrupt_file_names_it(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps(cifar_batch(3, 3, "labels", True))[:100])
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_cifar(tmp_path, "cifar10", "train")


def test_cifar_wrong_shape(tmp_path):
    folder = write_cifar10(tmp_path)
    dump(folder / "test_batch", {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, 2)
    with pytest.raises(DatasetError, match="test_batch.*3072"):
        load_cifar(tmp_path, "cifar10", "test")


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_forbidden_globals(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    dump(folder / "test_batch", {b"data": Exploit(marker), b"labels": []}, 2)
    with pytest.raises(DatasetError, match="forbidden global .*system") as info:
        load_cifar(tmp_path, "cifar10", "test")
    assert "test_batch" in str(info.value)
    assert not marker.exists()


def test_cifar_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar.html"):
        load_cifar(tmp_path, "cifar100", "train")
    with pytest.raises(ValueError, match="variant"):
        load_cifar(tmp_path, "cifar1000", "train")


# --------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------


def make_folder(root: Path) -> None:
    from PIL import Image

    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "dog").mkdir(parents=True)
    Image.new("RGB", (20, 10), (255, 0, 0)).save(root / "train" / "cat" / "a.png")
    Image.new("RGB", (12, 12), (0, 0, 255)).save(root / "train" / "cat" / "b.jpg", quality=95)
    # 16x8: a black left quarter that the center crop must drop.
    striped = Image.new("L", (16, 8), 255)
    striped.paste(0, (0, 0, 4, 8))
    striped.save(root / "train" / "dog" / "c.png")


def test_image_folder_decodes_and_caches(tmp_path, monkeypatch):
    import PIL.Image

    make_folder(tmp_path)
    ds = load_image_folder(tmp_path, "train", image_size=8)
    assert ds.images.shape == (3, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1]
    assert ds.images[0, 0].min() == 255 and ds.images[0, 2].max() == 0  # solid red
    assert (ds.images[2] == 255).all()  # black stripe cropped away
    caches = list((tmp_path / ".widenet-cache").glob("*.pt"))
    assert len(caches) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("cache should have been used")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    again = load_image_folder(tmp_path, "train", image_size=8)
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)
    assert again.classes == ds.classes


def test_image_folder_cache_keys_of_widenets_own_decoding_are_the_ones_caches_on_disk_have(tmp_path):
    """A key with the recorded resize is for folders decoded the processor's way; widenet's own decoding
    keeps the key it always had, rebuilt here from the file stamps, so caches users have stay valid."""
    import json

    from widenet.data.images.folder import _FOLDER_CACHE_VERSION, _folder_cache_key
    from widenet.files import file_stamp

    make_folder(tmp_path)
    base = tmp_path / "train"
    files = [(f, 0 if f.parent.name == "cat" else 1) for f in sorted(base.rglob("*.*"))]
    entries = [[f.relative_to(base).as_posix(), label, *file_stamp(f)] for f, label in files]
    before = {"v": _FOLDER_CACHE_VERSION, "files": entries, "size": 8, "channels": 3}
    key = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert _folder_cache_key(base, files, 8, 3) == key
    assert _folder_cache_key(base, files, 8, 3, {"crop": False, "resample": "bilinear"}) != key


def test_an_image_cache_damaged_in_place_is_rebuilt_not_trained_on(tmp_path):
    """Bytes of a cache's pixels changed at the same size: the damaged pixels were loaded, and their
    recorded contents hash (saved beside them) let --resume take them for the training images."""
    make_folder(tmp_path)
    first = load_image_folder(tmp_path, "train", image_size=8)
    (cache,) = (tmp_path / ".widenet-cache").glob("*.pt")
    damage_in_place(cache, first.images.numpy().tobytes())
    with pytest.warns(UserWarning, match=r"image cache .* \(its tensors do not match the checksum saved with them"):
        again = load_image_folder(tmp_path, "train", image_size=8)
    assert torch.equal(again.images, first.images) and again.contents == first.contents


def test_image_folder_cache_invalidated_by_changes(tmp_path):
    from PIL import Image

    make_folder(tmp_path)
    load_image_folder(tmp_path, "train", image_size=8, cache_dir=tmp_path / "c")
    Image.new("RGB", (9, 9), (0, 255, 0)).save(tmp_path / "train" / "dog" / "d.png")
    ds = load_image_folder(tmp_path, "train", image_size=8, cache_dir=tmp_path / "c")
    assert len(ds) == 4 and len(list((tmp_path / "c").glob("*.pt"))) == 2
    grey = load_image_folder(tmp_path, "train", image_size=6, channels=1, cache_dir=tmp_path / "c")
    assert grey.images.shape == (4, 1, 6, 6)


def test_a_file_replaced_with_the_same_size_and_mtime_is_decoded_again(tmp_path):
    """The cache was keyed by size and mtime only: a dataset unpacked again from an archive packed
    with fixed times (or `cp -p`, `touch -r`) kept serving the old pixels to training and eval. The
    older entry, now describing files that are gone, is removed."""
    make_folder(tmp_path)
    first = load_image_folder(tmp_path, "train", image_size=8)
    target = tmp_path / "train" / "dog" / "c.png"
    stat = target.stat()
    inverted = Image.open(target).point(lambda v: 255 - v)
    inverted.save(target)
    assert target.stat().st_size == stat.st_size  # the same bytes, one palette entry apart: a hard case
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = load_image_folder(tmp_path, "train", image_size=8)
    assert torch.equal(again.images[2], 255 - first.images[2])
    assert len(list((tmp_path / ".widenet-cache").glob("*.pt"))) == 1
    assert again.contents != first.contents  # a resumed run sees other pixels (the same names and sizes)
    assert again.contents.startswith("3 images, pixels ")
    os.utime(target)  # touched, not changed: decoded again, the same contents
    assert load_image_folder(tmp_path, "train", image_size=8).contents == again.contents


def test_images_the_folder_would_skip_are_followed_or_named(tmp_path):
    """Images in a linked folder inside a class were left out, and images lying beside the class
    folders or broken links were skipped without a word."""
    make_folder(tmp_path)
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(extra / "e.png")
    (tmp_path / "train" / "cat" / "linked").symlink_to(extra)
    (tmp_path / "train" / "cat" / "loop").symlink_to(tmp_path / "train")  # followed once, not forever
    (tmp_path / "train" / "cat" / "gone.png").symlink_to(tmp_path / "missing.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "loose.png")
    with pytest.warns(UserWarning) as notes:
        ds = load_image_folder(tmp_path, "train", image_size=8)
    assert ds.labels.tolist() == [0, 0, 0, 1]  # cat: a.png, b.jpg, linked/e.png; dog: c.png
    assert (ds.images[2, 1] == 255).all() and (ds.images[2, 0] == 0).all()  # the green e.png
    messages = sorted(str(n.message) for n in notes)
    assert any("skipped 1 file outside the class folders" in m and "loose.png" in m for m in messages)
    assert any("skipped 2 non-regular files (broken links" in m and "gone.png" in m for m in messages)  # + loop


def test_a_folder_reached_twice_counts_by_its_real_path_and_stale_entries_go_quietly(tmp_path, monkeypatch):
    """Which of two paths to one folder counted followed readdir's order (so did the training order
    and the cache key); an old cache entry that could not be deleted failed a load that had worked."""
    make_folder(tmp_path)
    cat = tmp_path / "train" / "cat"
    (cat / "z").mkdir()
    Image.new("RGB", (8, 8)).save(cat / "z" / "deep.png")
    (cat / "a").symlink_to(cat / "z")  # sorts first
    images, others = folder_files(cat)
    assert images == [cat / "a.png", cat / "b.jpg", cat / "z" / "deep.png"] and others == [cat / "a"]
    load_image_folder(tmp_path, "train", image_size=8)
    os.utime(cat / "a.png")

    def refuse(self, missing_ok=False):
        raise PermissionError(f"cannot remove {self}")

    monkeypatch.setattr(Path, "unlink", refuse)
    assert len(load_image_folder(tmp_path, "train", image_size=8)) == 4
    assert len(list((tmp_path / ".widenet-cache").glob("*.pt"))) == 2  # the old entry stays, the load goes on


def test_decoding_a_folder_beyond_the_memory_is_refused_first(tmp_path, monkeypatch):
    import widenet.memory as memory

    make_folder(tmp_path)
    monkeypatch.setattr(memory, "available_memory", lambda: 3 * 3 * 64 * 64 - 1)
    with pytest.raises(MemoryError, match=r"the 3 images of .*train decoded at 64 px need"):
        load_image_folder(tmp_path, "train", image_size=64)
    assert not (tmp_path / ".widenet-cache").exists()


def test_a_channel_that_never_varies_is_centred_not_divided_by_zero():
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 0] = torch.arange(16, dtype=torch.uint8).view(4, 2, 2)
    images[:, 2] = 255
    ds = ImageDataset(images, torch.tensor([0, 1, 0, 1]), ["a", "b"], "rg")
    assert ds.constant_channels == [1, 2]
    assert ds.std[0] == pytest.approx(float(images[:, 0].double().div(255).std(unbiased=False)))
    assert ds.std[1:] == (1.0, 1.0)


def test_image_folder_without_split(tmp_path):
    make_folder(tmp_path)
    ds = load_image_folder(tmp_path / "train", None, image_size=4)
    assert len(ds) == 3 and ds.name == "folder-train"


def test_image_folder_corrupt_file(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match="broken.png"):
        load_image_folder(tmp_path, "train", image_size=8)


def test_image_folder_empty(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        load_image_folder(tmp_path, "train", image_size=8)
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(DatasetError, match="train/cat: class folder holds no images"):
        load_image_folder(tmp_path, "train", image_size=8)
    with pytest.raises(DatasetNotFoundError):
        load_image_folder(tmp_path, "valid", image_size=8)


def test_an_empty_class_folder_is_named_and_other_files_are_skipped(tmp_path):
    """An empty class folder used to become a class no image belongs to (a head output never
    trained); a notes.txt or .DS_Store beside the images stopped the whole load."""
    from PIL import Image

    make_folder(tmp_path)
    (tmp_path / "train" / "owl").mkdir()
    with pytest.raises(DatasetError, match=r"train/owl: class folder holds no images \(nothing; images are read"):
        load_image_folder(tmp_path, "train", image_size=8)
    (tmp_path / "train" / "owl" / "owl.svg").write_text("<svg/>")
    with pytest.raises(DatasetError, match=r"train/owl: class folder holds no images \(only 1 file without an "
                                           r"image extension, e.g. owl.svg; images are read by extension: .png"):
        load_image_folder(tmp_path, "train", image_size=8)
    (tmp_path / "train" / "owl" / "owl.svg").unlink()
    (tmp_path / "train" / "owl").rmdir()
    (tmp_path / "train" / "dog" / "notes.txt").write_text("labelled by hand")
    (tmp_path / "train" / "cat" / "Thumbs.db").write_bytes(b"\0" * 8)
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0" * 8)  # hidden: skipped without a word
    Image.new("L", (8, 8), 9).save(tmp_path / "train" / "dog" / "d.TIFF")
    Image.new("L", (8, 8), 9).save(tmp_path / "train" / "dog" / "e.pgm")  # netpbm, as the ORL faces ship
    with pytest.warns(UserWarning, match=r"skipped 2 files without an image extension, e.g. .*Thumbs.db"):
        ds = load_image_folder(tmp_path, "train", image_size=8)
    assert len(ds) == 5 and ds.labels.tolist() == [0, 0, 1, 1, 1]


# --------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------


def test_load_dataset_dispatch(tmp_path, no_debian):
    write_fashion(tmp_path / "fm")
    ds = load_dataset("fashion-mnist", "test", data_dir=tmp_path / "fm", download=False)
    assert ds.images.shape == (5, 1, 28, 28)
    big = load_dataset("fashion-mnist", "test", data_dir=tmp_path / "fm", image_size=32, download=False)
    assert big.images.shape == (5, 1, 32, 32) and big.images.dtype == torch.uint8
    # the same pictures, larger: Pillow's bilinear resize of each one as the oracle (to rounding)
    for small, large in zip(ds.images, big.images):
        want = np.asarray(Image.fromarray(small[0].numpy()).resize((32, 32), Image.BILINEAR), dtype=np.int16)
        assert np.abs(large[0].numpy().astype(np.int16) - want).max() <= 1
    assert torch.equal(big.labels, ds.labels)
    write_cifar100(tmp_path / "c")
    assert load_dataset("cifar100", "train", data_dir=tmp_path / "c").num_classes == 100
    make_folder(tmp_path / "f")
    assert len(load_dataset("folder", "train", data_dir=tmp_path / "f", image_size=8)) == 3


def test_load_dataset_errors():
    with pytest.raises(ValueError, match="fashion-mnist, cifar10, cifar100, folder"):
        load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("folder", "train", image_size=8)


# --------------------------------------------------------------------------
# Dataset container, batching, subsets
# --------------------------------------------------------------------------


def indexed_dataset(n: int) -> ImageDataset:
    """Image i is filled with the value i, its label is i % 3."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, 3, 3).contiguous()
    return ImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"], "toy")


def test_image_dataset_properties_and_validation():
    ds = indexed_dataset(10)
    values = torch.arange(10, dtype=torch.float64) / 255
    assert ds.mean == pytest.approx((values.mean().item(),) * 2)
    assert ds.std == pytest.approx((values.std(unbiased=False).item(),) * 2)
    assert ds.image_size == 3 and ds.channels == 2 and ds.num_classes == 3
    with pytest.raises(DatasetError, match="uint8"):
        ImageDataset(ds.images.float(), ds.labels, ds.classes, "bad")
    with pytest.raises(DatasetError, match="labels"):
        ImageDataset(ds.images, ds.labels[:-1], ds.classes, "bad")
    with pytest.raises(DatasetError, match="classes"):
        ImageDataset(ds.images, ds.labels + 5, ds.classes, "bad")
    wide = ImageDataset(torch.zeros(1, 1, 2, 3, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), ["a"], "wide")
    assert wide.image_shape == (2, 3)
    with pytest.raises(ValueError, match="not square"):
        _ = wide.image_size


def test_epoch_order_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = epoch_order(50, seed=1, epoch=0)
    assert torch.equal(a, epoch_order(50, seed=1, epoch=0))
    assert torch.equal(torch.sort(a).values, torch.arange(50))
    assert not torch.equal(a, epoch_order(50, seed=1, epoch=1))
    assert not torch.equal(a, epoch_order(50, seed=2, epoch=0))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("drop_last", [False, True])
def test_iterate_batches_resumes_exactly(drop_last):
    ds = indexed_dataset(23)
    full = list(iterate_batches(ds, 5, shuffle=True, seed=3, epoch=2, drop_last=drop_last))
    assert len(full) == num_batches(23, 5, drop_last) == (4 if drop_last else 5)
    order = epoch_order(23, 3, 2)
    seen = torch.cat([images[:, 0, 0, 0] for images, _ in full]).long()
    assert torch.equal(seen, order[: len(seen)])
    for images, labels in full:
        assert torch.equal(labels, images[:, 0, 0, 0].long() % 3)
    resumed = list(iterate_batches(ds, 5, shuffle=True, seed=3, epoch=2, start_batch=2, drop_last=drop_last))
    assert len(resumed) == len(full) - 2
    for (a, la), (b, lb) in zip(resumed, full[2:], strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_iterate_batches_sequential_and_errors():
    ds = indexed_dataset(7)
    batches = list(iterate_batches(ds, 3, shuffle=False))
    assert [len(b[1]) for b in batches] == [3, 3, 1]
    assert batches[0][0][:, 0, 0, 0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="start_batch"):
        list(iterate_batches(ds, 3, shuffle=False, start_batch=4))
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(7, 0)


def test_subset():
    ds = indexed_dataset(20)
    small = subset(ds, 6, seed=1)
    assert len(small) == 6 and torch.equal(small.images, subset(ds, 6, seed=1).images)
    assert torch.equal(small.labels, small.images[:, 0, 0, 0].long() % 3)
    assert len(set(small.images[:, 0, 0, 0].tolist())) == 6
    assert len(subset(ds, 100, seed=1)) == 20
    with pytest.raises(ValueError):
        subset(ds, 0)
