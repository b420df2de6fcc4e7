"""Images to tokens: a strided patch convolution (ViT) or a small convolutional stem.

PatchEmbed is ViT's stem (Dosovitskiy et al. 2021): one convolution with
kernel = stride = patch size. ConvStem replaces it with log2(patch) 3x3
stride-2 convolutions (BatchNorm + ReLU), then a 1x1 projection to the
width (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"):
the same token grid, a few percent more FLOPs, and an encoder that no longer
has to learn local edges from single linear patches. Padded stride-2
convolutions round odd sizes up, so the conv stem also takes images whose
side is not a multiple of the patch (28 px at patch 8: 14, 7, then a 4x4 grid).
"""

from __future__ import annotations

import torch
from torch import nn

from ..listing import counted


class _ImageTokenizer(nn.Module):
    """Shared input checks: (B, C, H, W) images of the configured size -> (B, P, D) tokens."""

    def __init__(self, image_size: int, in_channels: int, grid: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.in_channels = in_channels
        self.grid = grid
        self.num_patches = self.grid ** 2
        self.proj: nn.Module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected floating-point images (normalised pixels), got {images.dtype}; "
                             "convert and normalise them first (uint8 pixels: images.float() / 255, then mean/std)")
        weights = next(self.proj.parameters()).dtype
        autocast = torch.is_autocast_enabled(images.device.type) and images.dtype != torch.float64  # it casts
        if images.dtype != weights and not autocast:  # (autocast leaves float64 as it is)
            raise ValueError(f"images are {images.dtype} but the model's weights are {weights}: convert one to "
                             f"the other (images.to({weights}), or model.to({images.dtype}))")
        _, c, h, w = images.shape
        if c != self.in_channels:
            raise ValueError(f"model expects {counted(self.in_channels, 'channel')}, got images with {c}")
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"model expects {self.image_size}x{self.image_size} images, got {h}x{w}")
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, P, D)


class PatchEmbed(_ImageTokenizer):
    """(B, C, H, W) images -> (B, P, D) tokens, P = (H / patch) * (W / patch)."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__(image_size, in_channels, token_grid("patch", image_size, patch_size, dim))
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)


class ConvStem(_ImageTokenizer):
    """(B, C, H, W) -> (B, P, D) through n = log2(patch) conv3x3/2-BN-ReLU layers and a 1x1 conv.

    Channels double up to the stem width W (default: the model width D):
    W / 2^(n-1), ..., W / 2, W; the 1x1 convolution maps W to D. Each layer
    halves the side, rounding up: P = ceil(H / patch)^2.
    BatchNorm uses each process's own batch statistics under data parallelism,
    so with this stem a run's result depends slightly on the number of processes
    (its running statistics are rank 0's at each evaluation and save).
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int,
                 width: int | None = None) -> None:
        super().__init__(image_size, in_channels, token_grid("conv", image_size, patch_size, dim, width))
        width = dim if width is None else width
        n = patch_size.bit_length() - 1
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(n):
            out = width >> (n - 1 - i)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        layers.append(nn.Conv2d(channels, dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)


STEMS = ("patch", "conv")


def token_grid(kind: str, image_size: int, patch_size: int, dim: int, width: int | None = None) -> int:
    """Tokens per side that stem `kind` makes of `image_size` images; a clear error for bad settings.

    patch: side / patch, which must be whole. conv: n = log2(patch) halvings
    rounded up, ceil(side / patch); the channels W / 2^(n-1) must be whole.
    """
    if kind not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {kind!r}")
    if kind == "patch":
        if width is not None:
            raise ValueError("stem_width applies to the conv stem only (stem=conv)")
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
        return image_size // patch_size
    n = patch_size.bit_length() - 1
    if patch_size < 2 or patch_size != 1 << n:
        raise ValueError(f"the conv stem needs a patch size that is a power of two, got {patch_size}")
    width = dim if width is None else width
    if width < 1 or width % (1 << (n - 1)):
        raise ValueError(f"the conv stem needs a width divisible by {1 << (n - 1)}, got {width}")
    return -(-image_size // patch_size)


def make_stem(kind: str, image_size: int, patch_size: int, in_channels: int, dim: int,
              width: int | None = None) -> _ImageTokenizer:
    """The stem named by VisionConfig.stem; width: the conv stem's channels (None: dim)."""
    token_grid(kind, image_size, patch_size, dim, width)
    if kind == "patch":
        return PatchEmbed(image_size, patch_size, in_channels, dim)
    return ConvStem(image_size, patch_size, in_channels, dim, width)
