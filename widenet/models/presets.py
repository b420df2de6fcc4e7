"""The paper's vision models (224 px, patch 16) and small 28x28 grey variants.

Sizes follow REFERENCE.md / the paper's Table 1. With num_classes=1001 and a
pre-logits representation layer the trainable parameter counts reproduce the
paper's column: ViT-B 87M, ViT-L 305M, ViT-MoE-B 128M, ViT-MoE-L 406M,
WideNet-B 29M, WideNet-L 40M, WideNet-H 63M.
"""

from __future__ import annotations

from .encoder import EncoderConfig
from .registry import register_model
from .vision import VisionConfig, VisionTransformer

WIDENET_SHARING = dict(moe_blocks="all", share_attention=True, share_ffn=True, share_norms=False)
ALBERT_SHARING = dict(share_attention=True, share_ffn=True, share_norms=True)


def _paper(dim: int, depth: int, heads: int, mlp: int, **encoder) -> VisionConfig:
    return VisionConfig(image_size=224, patch_size=16, in_channels=3, num_classes=1000,
                        encoder=EncoderConfig.from_dict(dict(dim=dim, depth=depth, num_heads=heads, mlp_dim=mlp,
                                                             **encoder)))


def _tiny(**encoder) -> VisionConfig:
    """28x28 grey images (Fashion-MNIST), patch 4 -> 49 tokens + class token."""
    sizes = dict(dim=64, depth=6, num_heads=4, mlp_dim=256)  # 4 experts, top-2: MoEConfig's defaults
    return VisionConfig(image_size=28, patch_size=4, in_channels=1, num_classes=10,
                        encoder=EncoderConfig.from_dict({**sizes, **encoder}))


def _vision(name: str, doc: str):
    return register_model(name, VisionTransformer, doc)


# --- the paper's models -------------------------------------------------------
@_vision("vit_b16", "ViT-B/16: 768 wide, 12 blocks, 12 heads, MLP 3072")
def vit_b16() -> VisionConfig:
    return _paper(768, 12, 12, 3072)


@_vision("vit_l16", "ViT-L/16: 1024 wide, 24 blocks, 16 heads, MLP 4096")
def vit_l16() -> VisionConfig:
    return _paper(1024, 24, 16, 4096)


@_vision("vit_moe_b16", "ViT-MoE-B/16: ViT-B with 4 experts (4096) in the last 2 blocks")
def vit_moe_b16() -> VisionConfig:
    return _paper(768, 12, 12, 3072, expert_dim=4096, moe_blocks="last:2")


@_vision("vit_moe_l16", "ViT-MoE-L/16: ViT-L with 4 experts (4096) in the last 4 blocks")
def vit_moe_l16() -> VisionConfig:
    return _paper(1024, 24, 16, 4096, moe_blocks="last:4")


@_vision("widenet_b16", "WideNet-B/16: 768 wide, 12 blocks, one shared MoE of 4 experts (4096)")
def widenet_b16() -> VisionConfig:
    return _paper(768, 12, 12, 4096, **WIDENET_SHARING)


@_vision("widenet_l16", "WideNet-L/16: 1024 wide, 24 blocks, one shared MoE of 4 experts (4096)")
def widenet_l16() -> VisionConfig:
    return _paper(1024, 24, 16, 4096, **WIDENET_SHARING)


@_vision("widenet_h16", "WideNet-H/16: 1280 wide, 32 blocks, one shared MoE of 4 experts (5120)")
def widenet_h16() -> VisionConfig:
    return _paper(1280, 32, 16, 5120, **WIDENET_SHARING)


# --- small models for 28x28 grey images (this CPU) ------------------------------
@_vision("vit_tiny", "ViT for 28x28 grey images: 64 wide, 6 blocks, 4 heads, MLP 256")
def vit_tiny() -> VisionConfig:
    return _tiny()


@_vision("vit_moe_tiny", "vit_tiny with 4 experts (256) in the last 2 blocks")
def vit_moe_tiny() -> VisionConfig:
    return _tiny(moe_blocks="last:2")


@_vision("albert_tiny", "vit_tiny with attention, MLP and norms all shared (ALBERT-style)")
def albert_tiny() -> VisionConfig:
    return _tiny(**ALBERT_SHARING)


@_vision("widenet_tiny", "WideNet for 28x28 grey images: shared attention + shared 4-expert MoE, own norms")
def widenet_tiny() -> VisionConfig:
    return _tiny(**WIDENET_SHARING)
