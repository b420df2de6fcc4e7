"""Tests for widenet.data.augment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from widenet.data import augment
from widenet.data.augment import (
    AugmentConfig,
    Augmenter,
    augment_batch,
    mixup,
    normalize,
    one_hot_smoothed,
    randaugment,
    random_crop_with_padding,
    random_hflip,
    random_resized_crop,
    sample_mixup_lambda,
    tf_randaugment_policy,
)


def uint8_batch(b: int = 6, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------
# normalize
# --------------------------------------------------------------------------


def test_normalize_values_and_dtype():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize(x, mean=(0.0, 0.1, 0.5), std=(1.0, 0.1, 0.5))
    assert out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx([0.0, 1.0, 1.0])
    assert normalize(uint8_batch(c=1), (0.5,), (0.25,)).shape == (6, 1, 16, 16)


def test_normalize_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="channels"):
        normalize(uint8_batch(c=3), (0.5, 0.5), (0.2, 0.2))
    with pytest.raises(ValueError, match="std"):
        normalize(uint8_batch(c=1), 0.5, 0.0)


# --------------------------------------------------------------------------
# crops and flips
# --------------------------------------------------------------------------


def test_random_resized_crop_shape_and_generator():
    x = uint8_batch().float() / 255
    a = random_resized_crop(x, generator=torch.Generator().manual_seed(1))
    b = random_resized_crop(x, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    with pytest.raises(TypeError, match="float"):
        random_resized_crop(uint8_batch())


def test_random_resized_crop_full_scale_is_identity():
    x = torch.rand(3, 2, 8, 8)
    out = random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_random_resized_crop_zooms_in():
    # A horizontal ramp: a crop covering a fraction s of the area has a range of about sqrt(s).
    ramp = torch.linspace(0, 1, 64).expand(4, 1, 64, 64).contiguous()
    out = random_resized_crop(ramp, scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    spans = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    assert torch.allclose(spans, torch.full_like(spans, 0.5), atol=0.03)


def test_random_resized_crop_keeps_the_aspect_ratio_on_non_square_images():
    """Only square images and ratio 1 were tested: a crop whose aspect ratio or sides were computed
    for the wrong side passed. 16 x 32 images with a horizontal ramp (channel 0) and a vertical one
    (channel 1); area 1/4 at aspect ratio 4 (width / height in pixels): by hand w * h = 128 px and
    w = 4h, so h = 5.66 of 16 and w = 22.6 of 32: the ramps span 0.354 and 0.707 of their ranges."""
    height, width = 16, 32
    x = torch.stack([torch.linspace(0, 1, width).expand(height, width),
                     torch.linspace(0, 1, height)[:, None].expand(height, width)]).expand(6, 2, height, width)
    out = random_resized_crop(x.contiguous(), scale=(0.25, 0.25), ratio=(4.0, 4.0),
                              generator=torch.Generator().manual_seed(0))
    across = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    down = out[:, 1, -1, 0] - out[:, 1, 0, 0]
    torch.testing.assert_close(across, torch.full_like(across, 0.5 ** 0.5), atol=0.02, rtol=0)
    torch.testing.assert_close(down, torch.full_like(down, 0.125 ** 0.5), atol=0.02, rtol=0)
    # Aspect ratio 1/4 at the whole area needs a crop 2.8 times the image's height: no draw fits, so
    # the whole image is kept (a crop taller than the image would smear its border rows).
    tall = random_resized_crop(x.contiguous(), scale=(1.0, 1.0), ratio=(0.25, 0.25))
    torch.testing.assert_close(tall, x, atol=1e-5, rtol=0)


def test_random_crop_with_padding_draws_every_offset():
    """Offsets 0..2p in both directions, each as likely (the last one was never drawn in a mutant)."""
    size, pad, batch = 5, 2, 500
    coded = (torch.arange(size * size) + 1).reshape(1, 1, size, size).expand(batch, 1, size, size).contiguous()
    out = random_crop_with_padding(coded, pad, generator=torch.Generator().manual_seed(0))
    offsets = []
    for image in out[:, 0]:
        i, j = (image > 0).nonzero()[0].tolist()  # a pixel of the image (not padding) and where it came from
        y, x = divmod(int(image[i, j]) - 1, size)
        offsets.append((y + pad - i, x + pad - j))
    counts = torch.zeros(2 * pad + 1, 2 * pad + 1)
    for dy, dx in offsets:
        counts[dy, dx] += 1
    assert bool((counts > 0).all()), counts  # all 25 offsets, about 20 times each
    padded = F.pad(coded, (pad, pad, pad, pad))
    assert all(torch.equal(out[n], padded[n, :, dy:dy + size, dx:dx + size]) for n, (dy, dx) in enumerate(offsets))


def test_random_crop_with_padding_is_a_shifted_window():
    x = uint8_batch(b=5, size=6)
    out = random_crop_with_padding(x, 2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        windows = [padded[i, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert torch.equal(random_crop_with_padding(x, 0), x)


def test_random_hflip():
    x = uint8_batch()
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, p=0.0), x)
    out = random_hflip(x, generator=torch.Generator().manual_seed(3))
    for i in range(len(x)):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))


# --------------------------------------------------------------------------
# RandAugment
# --------------------------------------------------------------------------


def policy_value(policy, name: str) -> float:
    """The value kornia applies for op ``name`` (symmetric ranges are scaled by m / 30)."""
    (entry,) = [p[0] for p in policy if p[0][0] == name]
    _, low, high = entry
    return high * augment._KORNIA_M / 30 if low == -high else high


def test_tf_policy_matches_tensorflow_values_at_15():
    policy = tf_randaugment_policy(15)
    assert len(policy) == 15
    assert policy_value(policy, "rotate") == pytest.approx(45.0)
    assert policy_value(policy, "color") == pytest.approx(2.8)
    assert policy_value(policy, "posterize") == 6
    assert math.tan(math.pi * policy_value(policy, "shear_x")) == pytest.approx(0.45)
    assert policy_value(policy, "translate_x") == pytest.approx(150 / 224)
    assert policy_value(policy, "solarize") == 1.0  # TF threshold 384 > 255: no-op
    with pytest.raises(ValueError, match="magnitude"):
        tf_randaugment_policy(30)


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_shapes_and_range(channels):
    torch.manual_seed(0)
    x = uint8_batch(b=8, c=channels).float() / 255
    out = randaugment(x, n=2, magnitude=15, group_size=3)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, x)


def test_randaugment_is_reproducible_under_manual_seed():
    x = uint8_batch(b=8, c=1).float() / 255
    torch.manual_seed(5)
    a = randaugment(x, 2, 9)
    torch.manual_seed(5)
    b = randaugment(x, 2, 9)
    assert torch.equal(a, b)
    assert torch.equal(randaugment(x, 0, 9), x)
    with pytest.raises(ValueError, match="channels"):
        randaugment(torch.rand(2, 2, 8, 8), 2, 9)


# --------------------------------------------------------------------------
# mixup and label smoothing
# --------------------------------------------------------------------------


def test_one_hot_smoothed():
    labels = torch.tensor([0, 3, 1])
    t = one_hot_smoothed(labels, 4, 0.1)
    torch.testing.assert_close(t.sum(1), torch.ones(3))
    assert t[1, 3].item() == pytest.approx(0.9 + 0.025) and t[1, 0].item() == pytest.approx(0.025)
    assert torch.equal(one_hot_smoothed(labels, 4, 0.0).argmax(1), labels)
    with pytest.raises(ValueError, match="labels"):
        one_hot_smoothed(torch.tensor([4]), 4, 0.1)
    with pytest.raises(ValueError, match="smoothing"):
        one_hot_smoothed(labels, 4, 1.0)


def test_mixup_with_known_lambda(monkeypatch):
    monkeypatch.setattr(augment, "sample_mixup_lambda", lambda alpha, generator=None: 0.3)
    x = torch.arange(3 * 2, dtype=torch.float32).view(3, 2, 1, 1)
    y = one_hot_smoothed(torch.tensor([0, 1, 2]), 3)
    mx, my = mixup(x, y, alpha=0.2)
    torch.testing.assert_close(mx, 0.3 * x + 0.7 * x[[2, 1, 0]])
    torch.testing.assert_close(my[0], torch.tensor([0.3, 0.0, 0.7]))
    torch.testing.assert_close(my.sum(1), torch.ones(3))


def test_mixup_with_seeded_generator():
    x, y = torch.rand(4, 3, 5, 5), one_hot_smoothed(torch.tensor([0, 1, 2, 3]), 4, 0.1)
    lam = sample_mixup_lambda(0.5, torch.Generator().manual_seed(7))
    assert 0 <= lam <= 1
    mx, my = mixup(x, y, 0.5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(mx, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(my, lam * y + (1 - lam) * y.flip(0))
    same = mixup(x, y, 0.0)
    assert same[0] is x and same[1] is y
    with pytest.raises(ValueError, match="soft targets"):
        mixup(x, torch.tensor([0, 1, 2, 3]), 0.5)


def test_mixup_lambda_follows_beta():
    torch.manual_seed(0)
    draws = torch.tensor([sample_mixup_lambda(0.2) for _ in range(400)])
    assert abs(draws.mean().item() - 0.5) < 0.08
    assert ((draws < 0.1) | (draws > 0.9)).float().mean() > 0.4  # Beta(0.2, 0.2) is U-shaped


def test_mixup_alphas_too_small_to_sample_are_refused(tmp_path):
    """PyTorch's Beta(alpha, alpha) draws underflow for tiny alpha and come out exactly 0.5, the most
    mixing, where the distribution has nearly all its mass at 0 and 1 (--mixup 1e-9 trained like 1e6)."""
    from widenet.train.config import TrainConfig

    concentration = torch.tensor([1e-3, 1e-3], dtype=torch.float64)  # the failure, in torch itself
    gen = torch.Generator().manual_seed(0)
    assert sum(float(torch._sample_dirichlet(concentration, generator=gen)[0]) == 0.5 for _ in range(400)) > 40
    draws = torch.tensor([sample_mixup_lambda(0.01, torch.Generator().manual_seed(i)) for i in range(400)])
    assert ((draws < 1e-3) | (draws > 1 - 1e-3)).float().mean() > 0.7 and not (draws == 0.5).any()  # still sound
    for alpha in (1e-9, 1e-3, 0.0099):
        with pytest.raises(ValueError, match=r"mixup alpha must be 0 \(off\) or at least 0.01"):
            sample_mixup_lambda(alpha)
        with pytest.raises(ValueError, match=r"mixup alpha must be 0 \(off\) or at least 0.01"):
            TrainConfig(mixup=alpha)
    assert TrainConfig(mixup=0).mixup == 0 and TrainConfig(mixup=0.01).mixup == 0.01


# --------------------------------------------------------------------------
# the combined pipeline
# --------------------------------------------------------------------------


FULL = AugmentConfig(crop="inception", flip=True, randaugment_n=2, randaugment_m=15, randaugment_group=4)


@pytest.mark.parametrize(
    "config",
    [AugmentConfig(), AugmentConfig(crop="pad-crop", flip=True), FULL],
    ids=["none", "pad-crop", "full"],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_augment_batch_shapes(config, channels):
    x = uint8_batch(b=8, c=channels)
    out = augment_batch(x, config, mean=[0.5] * channels, std=[0.25] * channels)
    assert out.shape == x.shape and out.dtype == torch.float32


def test_augment_batch_none_is_normalisation():
    x = uint8_batch()
    torch.testing.assert_close(augment_batch(x, AugmentConfig(), (0.5,) * 3, (0.2,) * 3), normalize(x, 0.5, 0.2))


def test_augment_batch_pad_crop_and_flip_give_shifted_and_mirrored_windows():
    """The training default: every output image, un-normalised, is one window of the zero-padded input
    or its mirror; over 32 images some are shifted, and some mirrored and some not (drawn per image)."""
    x = uint8_batch(b=32, size=6)
    config = AugmentConfig(crop="pad-crop", crop_padding=2, flip=True)
    out = augment_batch(x, config, mean=(0.5,) * 3, std=(0.25,) * 3, generator=torch.Generator().manual_seed(0))
    pixels = torch.round((out * 0.25 + 0.5) * 255).to(torch.uint8)
    padded = F.pad(x, (2, 2, 2, 2))
    shifted = mirrored = 0
    for i in range(len(x)):
        windows = {(r, c): padded[i, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)}
        plain = [at for at, w in windows.items() if torch.equal(pixels[i], w)]
        flipped = [at for at, w in windows.items() if torch.equal(pixels[i], w.flip(-1))]
        assert plain or flipped, f"image {i} is no window of the padded input"
        shifted += (2, 2) not in plain + flipped
        mirrored += not plain
    assert shifted > 0 and 0 < mirrored < len(x), (shifted, mirrored)


def test_augment_batch_reproducible_from_saved_rng_state():
    x = uint8_batch(b=8)
    augmenter = Augmenter(FULL, mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(11)
    state = torch.get_rng_state()
    a = augmenter(x)
    b = augmenter(x)
    torch.set_rng_state(state)
    assert torch.equal(augmenter(x), a)
    assert not torch.equal(a, b)


def test_augment_config_validation():
    with pytest.raises(ValueError, match="crop"):
        AugmentConfig(crop="random")
    with pytest.raises(ValueError, match="randaugment_m"):
        AugmentConfig(randaugment_n=2, randaugment_m=30)
