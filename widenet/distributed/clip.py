"""Gradient clipping to the global L2 norm, with weights whole or split across processes.

Both return the norm before clipping as a 0-dim tensor: reading it (float())
waits for the device, which a training step does not need to do.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .env import all_reduce_sum

__all__ = ["clip_grad_norm", "clip_grad_norm_with_shards"]


def clip_grad_norm(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip gradients to global L2 norm ``max_norm``; the pre-clip norm.

    ``max_norm`` of ``None`` or ``0`` only measures the norm. Parameters without
    gradients are ignored; with no gradients at all the norm is 0.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm is not None and max_norm < 0:
        raise ValueError(f"max_norm must be >= 0 or None, got {max_norm}")
    if not grads:
        return torch.zeros(())
    if not max_norm:
        norms = [torch.linalg.vector_norm(g.detach(), dtype=_norm_dtype(g)) for g in grads]
        return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def clip_grad_norm_with_shards(model: nn.Module, shards: list[nn.Parameter], max_norm: float | None,
                               group=None, on_backend=lambda t: t) -> torch.Tensor:
    """Clip to the global norm: replicated gradients count once, sharded ones summed over the
    process group that splits them (None: all ranks). on_backend moves a tensor where the
    process group's backend reduces it (CUDA for NCCL)."""
    if max_norm is not None and max_norm < 0:
        raise ValueError(f"max_norm must be >= 0 or None, got {max_norm}")
    sharded = {id(p) for p in shards}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())

    dtype = torch.promote_types(torch.float32, grads[0].dtype)

    def squares(gs: list[torch.Tensor]) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=grads[0].device)
        return sum((torch.linalg.vector_norm(g.detach(), dtype=_norm_dtype(g)).to(dtype) ** 2 for g in gs), zero)

    local = squares([p.grad for p in shards if p.grad is not None])
    total = squares([p.grad for p in model.parameters() if p.grad is not None and id(p) not in sharded])
    total = (total + all_reduce_sum(on_backend(local), group).to(total.device)).sqrt()
    if max_norm:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
    return total


def _norm_dtype(g: torch.Tensor) -> torch.dtype:
    """float32 for float32 and narrower gradients (bf16, fp16 are summed in float32), float64 for float64."""
    return torch.promote_types(torch.float32, g.dtype)
