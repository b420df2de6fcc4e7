"""FLOPs per image, counted by PyTorch's own FlopCounterMode.

The MoE dispatch runs real per-expert matmuls on the tokens each expert got,
so the count is the ACTIVE compute (top-k experts per token), as the paper
reports it, not E times the expert FFN.

Attention is counted through SDPA's math backend: the fused CPU kernel has no
FLOP formula in FlopCounterMode, and the count silently lost the two
attention matmuls (4 x T^2 x D per block).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def flops_per_image(model: nn.Module, image_shape: tuple[int, int, int], batch: int = 8) -> float:
    """Forward FLOPs per image in eval mode (mean over a batch of random images)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images = torch.randn(batch, *image_shape, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(images)
    model.train(was_training)
    return counter.get_total_flops() / batch
