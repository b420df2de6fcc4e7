"""flops_per_image against a hand count of every matmul and convolution."""

from __future__ import annotations

import pytest

from widenet.analysis.flops import flops_per_image
from widenet.models.registry import create_model, model_config, settings_for

SMALL = dict(dim=32, depth=2, num_heads=2, mlp_dim=64, image_size=16, patch_size=4, in_channels=1,
             num_classes=10, dropless=True)  # dropless: every token reaches its top-k experts


def _hand_count(v) -> int:
    """Forward multiply-adds x 2 of a pre-norm ViT / WideNet with a class token."""
    c = v.encoder
    patches = (v.image_size // v.patch_size) ** 2
    t, d = patches + 1, c.dim
    embed = 2 * patches * (v.in_channels * v.patch_size ** 2) * d  # patch convolution
    attention = 2 * t * d * 3 * d + 2 * (2 * t * t * d) + 2 * t * d * d  # qkv, q k^T and attn v, output
    if c.uses_moe:  # router, then top-k experts of width expert_dim per token
        ffn = 2 * t * d * c.moe.num_experts + c.moe.top_k * 2 * (2 * t * d * (c.expert_dim or c.mlp_dim))
    else:
        ffn = 2 * (2 * t * d * c.mlp_dim)
    return embed + c.depth * (attention + ffn) + 2 * d * v.num_classes


@pytest.mark.parametrize("name,backend", [("vit_tiny", "auto"), ("widenet_tiny", "loop"),
                                          ("widenet_tiny", "grouped")])
def test_flops_per_image_matches_a_hand_count(name, backend):
    model = create_model(name, **settings_for(model_config(name), dict(SMALL, expert_backend=backend)))
    c = model.cfg
    assert flops_per_image(model, (c.in_channels, c.image_size, c.image_size)) == _hand_count(c)
    assert all(m.backend == backend for m in model.modules() if hasattr(m, "backend"))  # restored


def test_flops_count_every_top_k_assignment_however_the_router_spreads_the_tokens():
    """With the capacity limit in force, a router that sends every token to the same two experts
    drops most assignments; the count is still the model's top-k compute, and the layer keeps its limit."""
    import torch

    model = create_model("widenet_tiny", **dict(SMALL, dropless=False))
    moe = model.encoder.moes[0]
    with torch.no_grad():
        moe.router.weight.zero_()  # equal logits: every token picks the same experts
    c = model.cfg
    assert flops_per_image(model, (c.in_channels, c.image_size, c.image_size)) == _hand_count(c)
    assert moe.cfg.dropless is False


@pytest.mark.parametrize("training", [True, False])
def test_flops_per_image_leaves_the_models_mode_as_it_was(training):
    """Counting runs the model in eval mode, then puts it (and every submodule) back as it was."""
    model = create_model("widenet_tiny", **SMALL).train(training)
    c = model.cfg
    flops_per_image(model, (c.in_channels, c.image_size, c.image_size))
    assert model.training is training
    assert all(m.training is training for m in model.modules())
