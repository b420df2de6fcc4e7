"""`widenet bench attention`: PyTorch's fused SDPA against plain batched matmuls.

Forward + backward of softmax(q k^T / sqrt(hs)) v on (B, nh, T, hs) tensors
for each sequence length T, with B chosen so that every length sees about
the same number of tokens. widenet.layers.attention takes the plain path on
the CPU up to SHORT_SEQUENCE tokens; this prints where that pays.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..layers.attention import SHORT_SEQUENCE, plain_attention
from .moe_bench import _time


def run_attention_bench(lengths: Sequence[int], heads: int = 4, head_dim: int = 16, tokens: int = 2176,
                        repeats: int = 30, device: str = "cpu", seed: int = 0) -> list[dict]:
    """Per length: batch, median fwd+bwd ms of SDPA and of plain_attention, and their ratio."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    rows = []
    for t in lengths:
        b = max(1, tokens // t)
        q, k, v = (torch.randn(b, heads, t, head_dim, device=dev, requires_grad=True) for _ in range(3))
        grad = torch.randn(b, heads, t, head_dim, device=dev)
        sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v).backward(grad), repeats, dev)
        plain = _time(lambda: plain_attention(q, k, v).backward(grad), repeats, dev)
        rows.append(dict(tokens=t, batch=b, sdpa_ms=sdpa, plain_ms=plain, plain_over_sdpa=plain / sdpa))
    return rows


def format_attention_bench(rows: list[dict], heads: int, head_dim: int, device: str) -> str:
    lines = [f"attention forward+backward, {heads} heads of {head_dim} on {device} "
             f"(the layer uses plain up to {SHORT_SEQUENCE} tokens on the CPU)",
             f"{'tokens':>7}{'batch':>7}{'sdpa ms':>10}{'plain ms':>10}{'plain/sdpa':>12}"]
    for r in rows:
        lines.append(f"{r['tokens']:>7}{r['batch']:>7}{r['sdpa_ms']:>10.2f}{r['plain_ms']:>10.2f}"
                     f"{r['plain_over_sdpa']:>12.2f}")
    return "\n".join(lines)
