"""Self-attention: both CPU paths (plain matmuls for short sequences, fused SDPA) against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from widenet.layers import attention as attention_module
from widenet.layers.attention import SHORT_SEQUENCE, Attention, plain_attention


def _by_hand(attn: Attention, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention written out: x (B, T, D), pad (B, T) True = padding."""
    b, t, d = x.shape
    h = attn.num_heads
    qkv = x @ attn.qkv.weight.t() + attn.qkv.bias  # (B, T, 3D)
    q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in qkv.split(d, dim=-1))  # (B, h, T, hs)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)  # (B, h, T, T)
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    return y @ attn.proj.weight.t() + attn.proj.bias


@pytest.fixture
def spy(monkeypatch):
    """Counts the layer's calls of the plain path."""
    calls = []

    def counting(q, k, v):
        calls.append(q.shape[2])
        return plain_attention(q, k, v)

    monkeypatch.setattr(attention_module, "plain_attention", counting)
    return calls


@pytest.mark.parametrize("tokens, plain", [(5, True), (SHORT_SEQUENCE, True), (SHORT_SEQUENCE + 1, False)])
def test_cpu_path_by_length_matches_hand_computation(spy, tokens, plain):
    torch.manual_seed(0)
    attn = Attention(16, 4).double()
    x = torch.randn(3, tokens, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _by_hand(attn, x))
    assert spy == ([tokens] if plain else [])


def test_padding_mask_and_dropout_take_the_fused_path(spy):
    torch.manual_seed(0)
    attn = Attention(16, 4).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    out = attn(x, pad)
    torch.testing.assert_close(out[~pad], _by_hand(attn, x, pad)[~pad])
    Attention(16, 4, attn_dropout=0.1).train()(x.float())
    assert spy == []


def test_plain_and_fused_paths_have_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(4, 17, 32, requires_grad=True)
    grads = []
    for limit in (SHORT_SEQUENCE, 0):  # plain, then fused
        monkeypatch.setattr(attention_module, "SHORT_SEQUENCE", limit)
        attn.zero_grad()
        x.grad = None
        out = attn(x)
        out.pow(2).sum().backward()
        grads.append((out.detach(), x.grad.clone(), attn.qkv.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
