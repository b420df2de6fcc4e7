"""Batched image augmentation on tensors (CPU or GPU).

All functions take a whole batch ``(B, C, H, W)``. Randomness comes from
torch's global RNG, or from an explicit ``torch.Generator`` where a function
accepts one, so restoring the torch RNG state (CPU, and CUDA on GPU) before a
step reproduces its augmentation exactly.

RandAugment uses ``kornia.augmentation.auto.RandAugment`` with a policy built
to reproduce the TensorFlow RandAugment magnitudes; see :func:`tf_randaugment_policy`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..listing import counted
from ..settings import check_types

__all__ = [
    "CROP_MODES",
    "AugmentConfig",
    "Augmenter",
    "augment_batch",
    "normalize",
    "random_resized_crop",
    "random_crop_with_padding",
    "random_hflip",
    "tf_randaugment_policy",
    "build_randaugment",
    "randaugment",
    "MIN_MIXUP_ALPHA",
    "check_mixup_alpha",
    "sample_mixup_lambda",
    "mixup",
    "one_hot_smoothed",
]

CROP_MODES = ("none", "pad-crop", "inception")


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _uniform(
    shape: Sequence[int],
    low: float | torch.Tensor,
    high: float | torch.Tensor,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Uniform samples drawn on the generator's device (or globally), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(tuple(shape), generator=generator, device=gen_device).to(device)
    return low + (high - low) * u


def _check_batch(images: torch.Tensor, what: str) -> None:
    if images.dim() != 4:
        raise ValueError(f"{what} expects a batch of shape (B, C, H, W), got {tuple(images.shape)}")


def _check_float(images: torch.Tensor, what: str) -> None:
    _check_batch(images, what)
    if not images.is_floating_point():
        raise TypeError(f"{what} expects float images, got {images.dtype}; convert with normalize() or .float() / 255")


def _per_channel(
    values: Sequence[float] | float | torch.Tensor, channels: int, like: torch.Tensor, what: str
) -> torch.Tensor:
    """``values`` as a (1, C, 1, 1) tensor matching ``like``'s dtype and device."""
    tensor = torch.as_tensor(values, dtype=like.dtype, device=like.device).flatten()
    if tensor.numel() == 1:
        tensor = tensor.expand(channels)
    if tensor.numel() != channels:
        raise ValueError(f"{what} has {counted(tensor.numel(), 'value')} but the images have "
                         f"{counted(channels, 'channel')}")
    return tensor.view(1, channels, 1, 1)


# --------------------------------------------------------------------------
# Normalisation and geometric augmentation
# --------------------------------------------------------------------------


def normalize(images: torch.Tensor, mean: Sequence[float] | float, std: Sequence[float] | float) -> torch.Tensor:
    """``(images / 255 - mean) / std`` as float32 for uint8 input.

    Float input is taken to be in [0, 1] already. ``mean``/``std`` are per
    channel in [0, 1] units (as ``ImageDataset.mean``/``.std``).
    """
    _check_batch(images, "normalize")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    channels = x.shape[1]
    std_t = _per_channel(std, channels, x, "std")
    if bool((std_t <= 0).any()):
        raise ValueError(f"std must be positive, got {std}")
    return (x - _per_channel(mean, channels, x, "mean")) / std_t


def random_resized_crop(
    images: torch.Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """Inception-style crop per image, resized back to the input size (bilinear).

    Each image gets an area fraction ~ U(scale) and a log-uniform aspect ratio
    in ``ratio``; of ``attempts`` draws the first that fits is used, else the
    whole image. Implemented with ``affine_grid`` + ``grid_sample``.
    """
    _check_float(images, "random_resized_crop")
    if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
    batch, _, height, width = images.shape
    device = images.device
    area = _uniform((batch, attempts), scale[0], scale[1], generator, device)
    log_r = _uniform((batch, attempts), math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = log_r.exp() * height / width  # width/height in pixels -> in fractions of the sides
    crop_w = (area * aspect).sqrt()  # fraction of the width
    crop_h = (area / aspect).sqrt()  # fraction of the height
    fits = (crop_w <= 1) & (crop_h <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full_like(fits[:, 0], attempts, dtype=torch.long))
    crop_w = torch.cat([crop_w, torch.ones_like(crop_w[:, :1])], 1).gather(1, first[:, None]).squeeze(1)
    crop_h = torch.cat([crop_h, torch.ones_like(crop_h[:, :1])], 1).gather(1, first[:, None]).squeeze(1)
    # Crop centres in normalised [-1, 1] coordinates, keeping the crop inside.
    centre_x = _uniform((batch,), -(1 - crop_w), 1 - crop_w, generator, device)
    centre_y = _uniform((batch,), -(1 - crop_h), 1 - crop_h, generator, device)
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = crop_w, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = crop_h, centre_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_crop_with_padding(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad by ``padding`` on each side, then crop back to (H, W) at a random offset per image."""
    _check_batch(images, "random_crop_with_padding")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    gen_device = generator.device if generator is not None else images.device
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator, device=gen_device).to(images.device)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # (B, W)
    index_b = torch.arange(batch, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[index_b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return cropped.permute(0, 3, 1, 2).contiguous()


def random_hflip(images: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    _check_batch(images, "random_hflip")
    flip = _uniform((images.shape[0],), 0.0, 1.0, generator, images.device) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


# --------------------------------------------------------------------------
# RandAugment (kornia)
# --------------------------------------------------------------------------

# kornia 0.9's RandAugment(n, m) needs 0 < m < 30 and sets every selected op's
# value to low + (high - low) * m / 30 over the op's (low, high) range (the
# sign of symmetric ops is random per image). TensorFlow's RandAugment
# (tensorflow/tpu autoaugment.py, used by the ViT/WideNet line of work) instead
# divides the magnitude by _MAX_LEVEL = 10: "magnitude 15" means 1.5 times the
# AutoAugment ranges (rotate 45 degrees, shear 0.45, enhance factor 2.8, ...),
# which kornia's default ranges cannot reach (its m=15 is only half of them).
# tf_randaugment_policy(M) therefore computes TF's value v of every op for
# magnitude M and encodes it as a degenerate range (v, v) -- or (-v', v') with
# v' = v * 30 / _KORNIA_M for symmetric ops -- and the policy runs at the fixed
# kornia m = _KORNIA_M, so each op gets exactly TF's value.
_KORNIA_M = 29
_TF_MAX_LEVEL = 10.0
_TF_TRANSLATE_FRACTION = 100.0 / 224.0  # TF translate_const=100 px on 224-px ImageNet inputs


def tf_randaugment_policy(magnitude: float) -> list[list[tuple[str, float, float]]]:
    """A kornia RandAugment policy giving TensorFlow's op values at ``magnitude``.

    ``magnitude`` is RandAugment's M as in TF (``level / 10`` of the AutoAugment
    ranges), e.g. 15 for the paper's "2 layers, magnitude 15". Differences to TF
    that kornia imposes: no Cutout op (15 of TF's 16 ops); ops are picked once
    per call for the whole (sub-)batch; brightness is additive in kornia and is
    capped at factor 2.0, solarize_add follows kornia (add, then solarize at 0.5)
    capped at 0.5, translations are capped below one image side.
    """
    if not 0 < magnitude < 30:
        raise ValueError(f"RandAugment magnitude must be in (0, 30) on the TF scale, got {magnitude}")
    level = magnitude / _TF_MAX_LEVEL
    to_symmetric = 30.0 / _KORNIA_M

    def sym(name: str, value: float) -> list[tuple[str, float, float]]:
        return [(name, -value * to_symmetric, value * to_symmetric)]

    def fixed(name: str, value: float) -> list[tuple[str, float, float]]:
        return [(name, value, value)]

    enhance = 1.8 * level + 0.1
    shear = math.atan(0.3 * level) / math.pi  # kornia: tan(value * 180 degrees) = TF shear coefficient
    translate = min(_TF_TRANSLATE_FRACTION * level, 0.95)
    return [
        [("auto_contrast", 0.0, 1.0)],  # no magnitude
        [("equalize", 0.0, 1.0)],
        [("invert", 0.0, 1.0)],
        sym("rotate", 30.0 * level),
        fixed("posterize", float(min(max(int(4 * level), 1), 8))),
        fixed("solarize", min(int(256 * level) / 255.0, 1.0)),
        fixed("solarize_add", min(int(110 * level) / 255.0, 0.5)),
        fixed("color", enhance),
        fixed("contrast", enhance),
        fixed("brightness", min(enhance, 2.0)),
        fixed("sharpness", enhance),
        sym("shear_x", shear),
        sym("shear_y", shear),
        sym("translate_x", translate),
        sym("translate_y", translate),
    ]


@lru_cache(maxsize=8)
def build_randaugment(n: int, magnitude: float) -> torch.nn.Module:
    """kornia ``RandAugment`` applying ``n`` ops at TF magnitude ``magnitude`` (cached)."""
    from kornia.augmentation.auto import RandAugment

    return RandAugment(n=n, m=_KORNIA_M, policy=tf_randaugment_policy(magnitude))


def randaugment(images: torch.Tensor, n: int, magnitude: float, group_size: int = 16) -> torch.Tensor:
    """Apply RandAugment to float images in [0, 1] (1 or 3 channels).

    kornia draws the ``n`` ops once per call, so the batch is processed in
    groups of ``group_size`` images, each group with its own ops. Grey images
    are repeated to 3 channels for kornia and averaged back to 1 channel.
    Randomness comes from torch's global RNG.
    """
    _check_float(images, "randaugment")
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"randaugment supports 1 or 3 channels, got {channels}")
    if n <= 0:
        return images
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    module = build_randaugment(n, float(magnitude))
    rgb = images.repeat(1, 3, 1, 1) if channels == 1 else images
    out = torch.cat([module(group) for group in rgb.split(group_size)])
    out = out.clamp(0.0, 1.0)
    return out.mean(dim=1, keepdim=True) if channels == 1 else out


# --------------------------------------------------------------------------
# Mixup and label smoothing
# --------------------------------------------------------------------------


# Below this, Beta(alpha, alpha) is almost all at 0 and 1 (no mixing), and PyTorch's gamma draws
# underflow: at alpha 1e-3 a quarter of its lambdas come out exactly 0.5, the most mixing of all.
MIN_MIXUP_ALPHA = 0.01


def check_mixup_alpha(alpha: float) -> None:
    """Refuse an alpha that is not 0 (off) and not at least MIN_MIXUP_ALPHA."""
    if not (alpha == 0 or alpha >= MIN_MIXUP_ALPHA):
        raise ValueError(f"mixup alpha must be 0 (off) or at least {MIN_MIXUP_ALPHA}, got {alpha}: smaller ones "
                         "mix almost never, and PyTorch's Beta sampler then draws 0.5, the most mixing, instead")


def sample_mixup_lambda(alpha: float, generator: torch.Generator | None = None) -> float:
    """One draw of lambda ~ Beta(alpha, alpha) (from ``generator`` or the global CPU RNG)."""
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be positive, got {alpha}")
    check_mixup_alpha(alpha)
    concentration = torch.tensor([alpha, alpha], dtype=torch.float64)
    if generator is None:
        return float(torch.distributions.Beta(concentration[0], concentration[1]).sample())
    if generator.device.type != "cpu":
        raise ValueError("sample_mixup_lambda needs a CPU generator")
    return float(torch._sample_dirichlet(concentration, generator=generator)[0])


def mixup(
    images: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each example with the batch reversed, one lambda per batch.

    Returns ``lambda * x + (1 - lambda) * x.flip(0)`` for the images and the
    soft targets ``(B, K)``. ``alpha <= 0`` returns the inputs unchanged.
    """
    if targets.dim() != 2 or not targets.is_floating_point():
        raise ValueError(f"mixup needs float soft targets of shape (B, K), got {targets.dtype} {tuple(targets.shape)}")
    if len(images) != len(targets):
        raise ValueError(f"mixup got {len(images)} images but {len(targets)} targets")
    if alpha <= 0:
        return images, targets
    lam = sample_mixup_lambda(alpha, generator)
    mixed_images = lam * images + (1.0 - lam) * images.flip(0)
    mixed_targets = lam * targets + (1.0 - lam) * targets.flip(0)
    return mixed_images, mixed_targets


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Float one-hot targets ``(B, K)`` with ``smoothing`` spread uniformly over all classes."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")
    one_hot = F.one_hot(labels.long(), num_classes).float()
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


# --------------------------------------------------------------------------
# The combined pipeline
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation settings (the defaults do nothing).

    crop: 'none', 'pad-crop' (zero-pad ``crop_padding`` then random crop) or
    'inception' (random resized crop with ``crop_scale``). randaugment_n = 0
    disables RandAugment; randaugment_m is the TF-scale magnitude (e.g. 15).
    """

    crop: str = "none"
    crop_padding: int = 4
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = False
    randaugment_n: int = 0
    randaugment_m: float = 15.0
    randaugment_group: int = 16

    def __post_init__(self) -> None:
        check_types(self)
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if not 0 < self.randaugment_m < 30:
            raise ValueError(f"randaugment_m must be in (0, 30), got {self.randaugment_m}")
        # kornia draws the n operations from the policy's without repeats, and refused more in its own words
        # only once the data had loaded.
        operations = len(tf_randaugment_policy(self.randaugment_m))
        if not 0 <= self.randaugment_n <= operations:
            raise ValueError(f"randaugment_n (--randaugment-n) must be in 0..{operations} (0: no RandAugment; it "
                             f"applies n of its {operations} operations, none twice), got {self.randaugment_n}")


class Augmenter:
    """Turns uint8 batches into augmented, normalised float32 batches.

    Order: crop, flip, RandAugment (on [0, 1] floats), normalisation.
    """

    def __init__(self, config: AugmentConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        self.config = config
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return augment_batch(images, self.config, self.mean, self.std, generator=generator)


def augment_batch(
    images: torch.Tensor,
    config: AugmentConfig,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment a uint8 batch per ``config`` and normalise it to float32.

    ``generator`` drives crop and flip; RandAugment always uses the global RNG.
    """
    _check_batch(images, "augment_batch")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if config.crop == "pad-crop":
        x = random_crop_with_padding(x, config.crop_padding, generator=generator)
    elif config.crop == "inception":
        x = random_resized_crop(x, scale=config.crop_scale, generator=generator)
    if config.flip:
        x = random_hflip(x, generator=generator)
    if config.randaugment_n:
        x = randaugment(x, config.randaugment_n, config.randaugment_m, config.randaugment_group)
    return normalize(x, mean, std)
