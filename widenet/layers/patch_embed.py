"""Image to patch tokens with one strided convolution (ViT, Dosovitskiy et al. 2021)."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """(B, C, H, W) images -> (B, P, D) tokens, P = (H / patch) * (W / patch)."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.grid = image_size // patch_size
        self.num_patches = self.grid ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        _, c, h, w = images.shape
        if c != self.in_channels:
            raise ValueError(f"model expects {self.in_channels} channel(s), got images with {c}")
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"model expects {self.image_size}x{self.image_size} images, got {h}x{w}")
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, P, D)
