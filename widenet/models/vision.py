"""Vision transformer head and stem around the shared encoder (ViT / WideNet)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..layers.moe import RoutingStats
from ..layers.patch_embed import make_stem, token_grid
from ..memory import check_model_fits
from ..settings import SettingTypeError, check_types
from .encoder import Encoder, EncoderConfig


@dataclass
class VisionConfig:
    """Image stem and classifier settings; `encoder` holds sizes and sharing.

    pool: "token" (class token) or "avg" (mean of patch tokens).
    stem: "patch" (ViT's patch convolution) or "conv" (3x3 stride-2
        convolutions down to the same token grid; patch_size a power of two,
        and the image side need not be a multiple of it: ceil(side / patch)).
    stem_width: channels of the conv stem's last 3x3 convolution (halved
        layer by layer going back); None: the model width.
    representation_size: width of the pre-logits layer (Linear + tanh) that
        the paper's ImageNet models use; None leaves it out.
    """

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    pool: str = "token"
    stem: str = "patch"
    stem_width: int | None = None
    representation_size: int | None = None
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig.from_dict(self.encoder)
        if not isinstance(self.encoder, EncoderConfig):
            raise SettingTypeError(f"encoder must be an EncoderConfig or a dict of its settings, got {self.encoder!r}")
        check_types(self)
        for name in ("image_size", "patch_size", "in_channels", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_classes < 2:
            raise ValueError("num_classes must be at least 2: a softmax over one class has a loss of 0 and "
                             "learns nothing")
        if self.pool not in ("token", "avg"):
            raise ValueError(f"pool must be 'token' or 'avg', got {self.pool!r}")
        if self.stem_width is not None and self.stem_width < 1:
            raise ValueError(f"stem_width must be a positive integer, got {self.stem_width!r}")
        token_grid(self.stem, self.image_size, self.patch_size, self.encoder.dim, self.stem_width)
        if self.representation_size is not None and self.representation_size < 1:
            raise ValueError(f"representation_size must be positive, got {self.representation_size}")

    @property
    def num_patches(self) -> int:
        return token_grid(self.stem, self.image_size, self.patch_size, self.encoder.dim, self.stem_width) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VisionOutput:
    """logits: (B, classes); aux_loss: () summed MoE loss; routing: per block."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    routing: list[RoutingStats | None]
    hidden_states: list[torch.Tensor] | None = None


class VisionTransformer(nn.Module):
    """ViT / ViT-MoE / ALBERT-style / WideNet image classifier (by config).

    images (B, C, H, W) -> patch tokens (B, P, D) -> [cls] + tokens + pos
    -> Encoder -> pool -> [pre-logits tanh] -> head.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        check_model_fits(lambda: VisionTransformer(cfg))  # before any weight is allocated
        self.cfg = cfg
        dim = cfg.encoder.dim
        self.patch_embed = make_stem(cfg.stem, cfg.image_size, cfg.patch_size, cfg.in_channels, dim,
                                     cfg.stem_width)
        n_tokens = cfg.num_patches + (1 if cfg.pool == "token" else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.pool == "token" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, dim))
        self.pos_drop = nn.Dropout(cfg.encoder.dropout)
        self.encoder = Encoder(cfg.encoder)
        rep = cfg.representation_size
        self.pre_logits = nn.Sequential(nn.Linear(dim, rep), nn.Tanh()) if rep else nn.Identity()
        self.head = nn.Linear(rep or dim, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original (JAX) ViT's init: Xavier-uniform dense layers, zero biases and head.

        (timm's trunc-normal 0.02 suits width 768 but starves narrow models:
        at width 64 it trained 2x slower in our runs.)
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, images: torch.Tensor, return_hidden_states: bool = False):
        """images (B, C, H, W) -> EncoderOutput with hidden (B, T, D)."""
        x = self.patch_embed(images)  # (B, P, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+P, D)
        x = self.pos_drop(x + self.pos_embed)
        return self.encoder(x, return_hidden_states=return_hidden_states)

    def forward_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D) -> logits (B, classes)."""
        pooled = hidden[:, 0] if self.cfg.pool == "token" else hidden.mean(dim=1)  # (B, D)
        return self.head(self.pre_logits(pooled))

    def forward(self, images: torch.Tensor, return_hidden_states: bool = False) -> VisionOutput:
        feats = self.forward_features(images, return_hidden_states)
        return VisionOutput(self.forward_head(feats.hidden), feats.aux_loss, feats.routing, feats.hidden_states)
