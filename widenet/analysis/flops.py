"""FLOPs per image, counted by PyTorch's own FlopCounterMode.

The MoE dispatch runs real per-expert matmuls on the tokens each expert got,
so the count is the ACTIVE compute (top-k experts per token), as the paper
reports it, not E times the expert FFN.

Attention is counted through SDPA's math backend: the fused CPU kernel has no
FLOP formula in FlopCounterMode, and the count silently lost the two
attention matmuls (4 x T^2 x D per block). The experts are counted on their
per-expert loop for the same reason: torch._grouped_mm (the "grouped"
backend, auto's pick on some GPUs) has no formula either, and the count lost
every expert matmul.

Every MoE layer is counted dropless: each token reaches its top-k experts.
With the capacity limit the count followed the routing of the random
probe images, which a trained router spreads unevenly: two trainings of
`widenet_tiny` (with its own and with shared LayerNorms, the same top-2
compute of 19.8M per image) read 18.0M and 15.2M.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..layers.moe import Experts, dropless_routing


def flops_per_image(model: nn.Module, image_shape: tuple[int, int, int], batch: int = 8) -> float:
    """Forward FLOPs per image in eval mode (mean over a batch of random images)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images = torch.randn(batch, *image_shape, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), _countable(model), counter:
        model(images)
    model.train(was_training)
    return counter.get_total_flops() / batch


@contextmanager
def _countable(model: nn.Module) -> Iterator[None]:
    """Meanwhile every MoE layer of the model is dropless and its experts run their per-expert
    loop (the top-k compute, on kernels FlopCounterMode can count)."""
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    backends = [m.backend for m in experts]
    for m in experts:
        m.backend = "loop"
    try:
        with dropless_routing(model):
            yield
    finally:
        for m, backend in zip(experts, backends):
            m.backend = backend
