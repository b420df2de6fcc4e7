"""Presets: the paper's parameter counts, every preset trains and round-trips, errors (compile: test_compile.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import widenet
from widenet.models.registry import model_config

PAPER = {  # name: (floor of millions in the paper, derived exact millions from REFERENCE.md)
    "vit_b16": (87, 87.16),
    "vit_l16": (305, 305.38),
    "vit_moe_b16": (128, 128.09),
    "vit_moe_l16": (406, 406.12),
    "widenet_b16": (29, 29.69),
    "widenet_l16": (40, 40.94),
    "widenet_h16": (63, 63.34),
}
TINY = ["albert_tiny", "vit_moe_tiny", "vit_tiny", "widenet_tiny"]
# Shrinks the paper-sized presets (depth 4 so that "last:4" stays valid).
SHRINK = {"depth": 4, "dim": 64, "num_heads": 2, "mlp_dim": 64, "expert_dim": 64, "image_size": 32, "patch_size": 16}


def _overrides(name):
    return {} if name.endswith("_tiny") else dict(SHRINK)


def _images(model, batch, seed=0):
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def test_registry_lists_every_preset():
    assert set(widenet.list_models()) >= set(PAPER) | set(TINY)
    assert widenet.list_models() == sorted(widenet.list_models())


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_parameter_counts(name):
    floor_m, exact_m = PAPER[name]
    with torch.device("meta"):
        model = widenet.create_model(name, num_classes=1001, representation=True)
    params = widenet.count_parameters(model)
    assert math.floor(params / 1e6) == floor_m
    assert abs(params / 1e6 - exact_m) <= 0.005, params


def test_paper_configs_match_reference_table():
    rows = {  # dim, mlp, expert, depth, heads, moe ids
        "vit_b16": (768, 3072, None, 12, 12, []),
        "vit_l16": (1024, 4096, None, 24, 16, []),
        "vit_moe_b16": (768, 3072, 4096, 12, 12, [10, 11]),
        "vit_moe_l16": (1024, 4096, 4096, 24, 16, [20, 21, 22, 23]),
        "widenet_b16": (768, 4096, 4096, 12, 12, list(range(12))),
        "widenet_l16": (1024, 4096, 4096, 24, 16, list(range(24))),
        "widenet_h16": (1280, 5120, 5120, 32, 16, list(range(32))),
    }
    for name, (dim, mlp, expert, depth, heads, moe_ids) in rows.items():
        cfg = model_config(name)
        enc = cfg.encoder
        assert (cfg.image_size, cfg.patch_size, cfg.in_channels) == (224, 16, 3), name
        assert (enc.dim, enc.depth, enc.num_heads) == (dim, depth, heads), name
        assert enc.moe_block_ids == moe_ids, name
        if moe_ids:
            assert (enc.expert_dim or enc.mlp_dim) == expert, name
            assert (enc.moe.num_experts, enc.moe.top_k, enc.moe.capacity_factor) == (4, 2, 1.2), name
        if len(moe_ids) < depth:
            assert enc.mlp_dim == mlp, name
        widenet_like = name.startswith("widenet")
        assert enc.share_attention == widenet_like and enc.share_ffn == widenet_like, name
        assert not enc.share_norms, name


def test_representation_shorthand():
    cfg = model_config("widenet_tiny", representation=True)
    assert cfg.representation_size == cfg.encoder.dim
    model = widenet.create_model("widenet_tiny", representation=True, num_classes=5)
    assert model.head.weight.shape == (5, cfg.encoder.dim)
    assert model.model_name == "widenet_tiny"
    for value in ("no", 1, None):  # a truthy or falsy non-boolean added (or not) a pre-logits layer
        with pytest.raises(TypeError, match=f"representation must be True or False, got {value!r}"):
            model_config("widenet_tiny", representation=value)


# ----------------------------------------------------------------------------
# Every preset: forward, backward, gradients, state-dict round trip
# ----------------------------------------------------------------------------
ALL = sorted(set(PAPER) | set(TINY))


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = widenet.create_model(name, **_overrides(name)).train()
    # The library zero-initialises the classifier head, so in a first step every
    # gradient before the head would be exactly zero. Give the head small random
    # weights so that the check below sees gradients flowing through the whole net.
    with torch.no_grad():
        model.head.weight.normal_(std=0.02)
    x = _images(model, 4)
    out = model(x)
    assert out.logits.shape == (4, model.cfg.num_classes)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss)
    target = torch.arange(4) % model.cfg.num_classes
    loss = F.cross_entropy(out.logits, target) + 0.01 * out.aux_loss
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"
    if model.cfg.encoder.uses_moe:
        assert out.aux_loss.item() > 0
        assert sum(r is not None for r in out.routing) == len(model.cfg.encoder.moe_block_ids)
    else:
        assert out.aux_loss.item() == 0.0


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name, tmp_path):
    torch.manual_seed(1)
    model = widenet.create_model(name, **_overrides(name))
    with torch.no_grad():
        model.head.weight.normal_(std=0.02)
        model.head.bias.normal_(std=0.02)
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(2)
    fresh = widenet.create_model(name, **_overrides(name))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    fresh.eval()
    x = _images(model, 2)
    with torch.no_grad():
        a, b = model(x), fresh(x)
    assert torch.isfinite(a.logits).all()
    assert a.logits.abs().sum() > 0
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------
def test_unknown_model_name():
    with pytest.raises(ValueError, match="no_such_model"):
        widenet.create_model("no_such_model")


def test_unknown_override():
    with pytest.raises(ValueError, match="wingspan"):
        widenet.create_model("widenet_tiny", wingspan=3)


@pytest.mark.parametrize("override", [
    {"num_heads": 5},                  # 128 % 5 != 0
    {"dim": 100, "num_heads": 8},
    {"depth": 1, "moe_blocks": "last:2"},
    {"top_k": 5},                      # > 4 experts in an MoE model
    {"image_size": 30},                # not divisible by patch 4
    {"pool": "max"},
    {"num_classes": 0},
])
def test_bad_overrides(override):
    with pytest.raises(ValueError):
        widenet.create_model("widenet_tiny", **override)


def test_vit_moe_l16_last4_needs_depth4():
    with pytest.raises(ValueError):
        model_config("vit_moe_l16", depth=3)


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 1, 32, 32), (2, 1, 28, 24), (1, 28, 28)])
def test_bad_images(shape):
    model = widenet.create_model("widenet_tiny")
    with pytest.raises(ValueError):
        model(torch.randn(*shape))


def test_encoder_settings_as_one_dictionary_are_refused_with_the_way_to_give_them():
    with pytest.raises(ValueError, match="give encoder settings one by one by name"):
        widenet.create_model("widenet_tiny", encoder={"dim": 32})


def test_a_single_class_head_is_refused():
    """create_model(..., num_classes=1) built a one-class softmax: its cross entropy is 0 for any weights."""
    logits = torch.randn(5, 1, requires_grad=True)
    loss = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(logits.grad) == 0  # why: nothing to learn from
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        widenet.create_model("widenet_tiny", num_classes=1)
    with pytest.raises(ValueError, match="num_labels must be at least 2 for task='classify'"):
        widenet.create_model("widenet_text_tiny", task="classify", num_labels=1)
    assert widenet.create_model("widenet_text_tiny", task="qa", num_labels=1).cfg.task == "qa"  # no label head there
