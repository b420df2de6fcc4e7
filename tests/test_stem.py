"""Image stems: ViT's patch convolution and the convolutional stem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from widenet.layers.patch_embed import ConvStem, PatchEmbed, make_stem
from widenet.models.registry import create_model


def test_patch_embed_is_one_linear_map_per_patch():
    stem = PatchEmbed(8, 4, 2, 5)
    images = torch.randn(3, 2, 8, 8)
    tokens = stem(images)  # (3, 4, 5)
    # Token 1 is the top-right patch: rows 0-3, columns 4-7, flattened (C, kh, kw) as the kernel.
    patch = images[:, :, 0:4, 4:8].reshape(3, -1)
    expected = patch @ stem.proj.weight.reshape(5, -1).t() + stem.proj.bias
    torch.testing.assert_close(tokens[:, 1], expected)


@pytest.mark.parametrize("patch,channels", [(2, [16]), (4, [8, 16]), (8, [4, 8, 16])])
def test_conv_stem_layers_and_token_grid(patch, channels):
    stem = ConvStem(32, patch, 3, 16)
    convs = [m for m in stem.proj if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[:-1]] == channels  # doubling up to the width
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in convs[:-1])
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 16
    assert sum(isinstance(m, nn.BatchNorm2d) for m in stem.proj) == len(channels)
    tokens = stem(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, (32 // patch) ** 2, 16) == (2, stem.num_patches, 16)


def test_conv_stem_tokens_see_only_their_neighbourhood():
    """Changing the bottom-right corner pixel moves only the last tokens, not the first one."""
    stem = ConvStem(16, 4, 1, 8).eval()
    images = torch.randn(1, 1, 16, 16)
    changed = images.clone()
    changed[..., -1, -1] += 10.0
    delta = (stem(changed) - stem(images)).abs().sum(-1)[0]  # (16,) per token
    assert delta[0] == 0 and delta[-1] > 0


def test_conv_stem_rounds_odd_sides_up():
    """28 px at patch 8: 3x3 stride-2 convolutions with padding give 14, 7, then 4 (= ceil(28 / 8))."""
    stem = ConvStem(28, 8, 1, 16)
    sides, x = [], torch.randn(2, 1, 28, 28)
    for layer in stem.proj:
        x = layer(x)
        if isinstance(layer, nn.Conv2d):
            sides.append(x.shape[-1])
    assert sides == [14, 7, 4, 4]
    assert stem(torch.randn(2, 1, 28, 28)).shape == (2, 16, 16) and stem.num_patches == 16


def test_conv_stem_width_sets_the_channels_and_the_projection_maps_to_dim():
    stem = ConvStem(32, 8, 1, 16, width=96)
    convs = [m for m in stem.proj if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 24), (24, 48), (48, 96), (96, 16)]
    assert stem(torch.randn(2, 1, 32, 32)).shape == (2, 16, 16)


@pytest.mark.parametrize("patch,dim,width,message", [
    (6, 16, None, "power of two"), (1, 16, None, "power of two"), (8, 6, None, "width divisible by 4"),
    (8, 16, 90, "width divisible by 4, got 90")])
def test_conv_stem_errors(patch, dim, width, message):
    with pytest.raises(ValueError, match=message):
        ConvStem(48, patch, 1, dim, width)
    with pytest.raises(ValueError, match=message):
        make_stem("conv", 48, patch, 1, dim, width)


def test_make_stem_and_model_setting():
    assert isinstance(make_stem("patch", 28, 4, 1, 8), PatchEmbed)
    assert isinstance(make_stem("conv", 28, 4, 1, 8), ConvStem)
    with pytest.raises(ValueError, match="stem must be one of patch, conv"):
        make_stem("resnet", 28, 4, 1, 8)
    with pytest.raises(ValueError, match="stem must be one of patch, conv"):
        create_model("widenet_tiny", stem="resnet")
    model = create_model("widenet_tiny", stem="conv", patch_size=8, image_size=32)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.logits.shape == (2, 10)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.patch_embed.parameters())
    with pytest.raises(ValueError, match="expects 32x32 images"):
        model(torch.randn(2, 1, 28, 28))


def test_model_token_count_follows_the_stem():
    """The conv stem takes 28 px at patch 8 (4x4 tokens); ViT's patch stem refuses it."""
    model = create_model("widenet_tiny", stem="conv", patch_size=8, stem_width=32)
    assert model.cfg.num_patches == 16 and model.pos_embed.shape == (1, 17, 64)
    assert model(torch.randn(2, 1, 28, 28)).logits.shape == (2, 10)
    with pytest.raises(ValueError, match="image size 28 is not divisible by patch size 8"):
        create_model("widenet_tiny", patch_size=8)
    with pytest.raises(ValueError, match="stem_width applies to the conv stem only"):
        create_model("widenet_tiny", stem_width=32)
    with pytest.raises(ValueError, match="stem_width must be a positive integer"):
        create_model("widenet_tiny", stem="conv", stem_width=0)


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_images_that_are_not_floating_point_are_refused_by_name(stem):
    """uint8 pixels straight from a decoder failed deep in the convolution (a bias dtype mismatch)."""
    model = create_model("vit_tiny", stem=stem, dim=32, depth=1, num_heads=2, mlp_dim=64)
    with pytest.raises(ValueError, match="expected floating-point images .* got torch.uint8"):
        model(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images are torch.float64 but the model's weights are torch.float32: "
                                         r"convert one to the other \(images.to\(torch.float32\), or model.to"):
        model(torch.zeros(1, 1, 28, 28, dtype=torch.float64))
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():  # as it says: either way round gives the model's answer
        torch.testing.assert_close(model.double()(x).logits.float(), model.float()(x.float()).logits, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the convolution casts for itself,
            assert model.float()(x.half()).logits.shape == (2, 10)
            with pytest.raises(ValueError, match="images are torch.float64"):  # but not from float64
                model(x)
