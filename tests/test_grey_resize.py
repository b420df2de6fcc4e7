"""Grey images read by an RGB model are resized as one channel, then repeated into R, G and B:
the same pixels as converting first and resizing three channels (the old order), a third of the
resize's work. Both ways images reach a model are checked: decode_image (image folders, predict)
and resize_dataset (Fashion-MNIST converted for an RGB model, `--image-size`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from widenet.data.images import ImageDataset, convert_channels, load_dataset, resize_dataset
from widenet.data.images.folder import decode_image

pytestmark = pytest.mark.usefixtures("single_thread")


def _old_decode(path, size, crop, resample):
    """decode_image's former order for an RGB model: to RGB first, then the central square, then the resize."""
    with Image.open(path) as image:
        image.load()
        if image.mode.startswith("I"):  # 16-bit grey to 8 bits, as decode_image does
            wide = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255)
            image = Image.fromarray(wide.round().astype(np.uint8), "L")
        image = image.convert("RGB")
    if crop:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    image = image.resize((size, size), Image.Resampling[resample.upper()])
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


@pytest.fixture
def resized_modes(monkeypatch):
    """The Pillow modes of the images Image.resize is asked to resize."""
    modes: list[str] = []
    resize = Image.Image.resize

    def spy(self, *args, **kwargs):
        modes.append(self.mode)
        return resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    return modes


def _grey_files(tmp_path):
    rng = np.random.RandomState(0)
    files = {}
    for name, (width, height) in dict(small=(28, 28), wide=(300, 200), tall=(31, 47)).items():
        files[name] = tmp_path / f"{name}.png"
        Image.fromarray((rng.rand(height, width) * 255).astype(np.uint8), "L").save(files[name])
    files["alpha"] = tmp_path / "alpha.png"
    Image.open(files["wide"]).convert("LA").save(files["alpha"])
    files["sixteen"] = tmp_path / "sixteen.png"  # 16-bit grey (Pillow: "I;16", or "I" before 10.3)
    Image.fromarray((rng.rand(40, 40) * 65535).astype(np.uint16)).save(files["sixteen"])
    return files


@pytest.mark.parametrize("resample", ["bicubic", "bilinear", "lanczos", "nearest"])
def test_a_grey_file_is_resized_grey_then_made_rgb_with_the_same_pixels(tmp_path, resized_modes, resample):
    for name, path in _grey_files(tmp_path).items():
        for size in (224, 16):  # upscaled and downscaled
            for crop in (True, False):
                resized_modes.clear()
                ours = decode_image(path, size, 3, crop=crop, resample=resample)
                assert ours.shape == (3, size, size) and ours.dtype == torch.uint8
                assert resized_modes == ["L"], (name, size, crop)  # one channel through the resize
                assert torch.equal(ours, _old_decode(path, size, crop, resample)), (name, size, crop, resample)


def test_colour_files_and_grey_models_decode_as_before(tmp_path, resized_modes):
    rng = np.random.RandomState(1)
    colour = tmp_path / "colour.png"
    Image.fromarray((rng.rand(30, 50, 3) * 255).astype(np.uint8), "RGB").save(colour)
    ours = decode_image(colour, 24, 3)
    assert resized_modes == ["RGB"]
    assert torch.equal(ours, _old_decode(colour, 24, True, "bicubic"))
    grey = _grey_files(tmp_path)["wide"]
    expected = np.asarray(Image.open(grey).crop((50, 0, 250, 200)).resize((24, 24), Image.Resampling.BICUBIC))
    assert torch.equal(decode_image(grey, 24, 1), torch.from_numpy(expected.copy())[None])


@pytest.fixture
def interpolated_channels(monkeypatch):
    """The channel counts of the tensors F.interpolate is asked to resize."""
    channels: list[int] = []
    interpolate = F.interpolate

    def spy(tensor, *args, **kwargs):
        channels.append(tensor.shape[1])
        return interpolate(tensor, *args, **kwargs)

    monkeypatch.setattr(F, "interpolate", spy)
    return channels


def _old_resize(images, size):
    """resize_dataset's former way: every channel of the images resized."""
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def test_a_dataset_made_rgb_from_grey_is_resized_on_one_channel(interpolated_channels):
    rng = np.random.RandomState(2)
    grey = ImageDataset(torch.from_numpy((rng.rand(6, 1, 28, 28) * 255).astype(np.uint8)),
                        torch.tensor([0, 1, 0, 1, 0, 1]), ["a", "b"], "grey")
    rgb = convert_channels(grey, 3)
    for size in (224, 14, 37):
        interpolated_channels.clear()
        resized = resize_dataset(rgb, size)
        assert interpolated_channels == [1]
        assert resized.images.shape == (6, 3, size, size) and resized.images.is_contiguous()
        assert torch.equal(resized.images, _old_resize(rgb.images, size)), size
        assert resized.labels.tolist() == grey.labels.tolist() and resized.classes == ["a", "b"]


def test_colour_datasets_are_resized_on_all_their_channels(interpolated_channels):
    rng = np.random.RandomState(3)
    images = torch.from_numpy((rng.rand(4, 3, 32, 32) * 255).astype(np.uint8))
    images[:2, 1:] = images[:2, :1]  # grey in R, G and B except...
    images[1, 2, 5, 5] ^= 1  # ...one pixel: colour after all
    colour = ImageDataset(images, torch.tensor([0, 1, 0, 1]), ["a", "b"], "colour")
    resized = resize_dataset(colour, 20)
    assert interpolated_channels == [3]
    assert torch.equal(resized.images, _old_resize(images, 20))


def test_fashion_mnist_for_an_rgb_model_is_resized_on_one_channel(fmnist_dir, interpolated_channels):
    ours = load_dataset("fashion-mnist", "test", fmnist_dir, image_size=56, download=False, channels=3)
    assert interpolated_channels and set(interpolated_channels) == {1}
    grey = load_dataset("fashion-mnist", "test", fmnist_dir, download=False)
    assert torch.equal(ours.images, _old_resize(grey.images.expand(-1, 3, -1, -1), 56))
