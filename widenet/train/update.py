"""One optimizer update, and the loss scale float16 autocast needs.

Under float16 autocast, small gradients underflow to zero in the backward pass
(float16 keeps nothing below ~6e-8): a `widenet_tiny` loss of 1e-5 x its cross
entropy gives all-zero gradients. The loss is therefore scaled up before
backward and the gradients scaled back before clipping and the optimizer
(torch.amp.GradScaler); a step whose gradients overflowed is skipped and the
scale lowered. bfloat16 has float32's range and needs no scale.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..distributed.parallel import ParallelContext

__all__ = ["apply_update", "loss_scaler"]


def loss_scaler(amp: torch.dtype | None, device: torch.device, parallel: ParallelContext | None = None
                ) -> torch.amp.GradScaler | None:
    """A GradScaler for float16 autocast, else None. Refused where the processes' gradients differ
    (--fsdp shards, --expert-parallel experts): they would not agree on which steps overflowed."""
    if amp != torch.float16:
        return None
    if parallel is not None and parallel.mode in ("fsdp", "expert"):
        raise ValueError(f"float16 autocast (--amp fp16, or --amp auto on a GPU without bfloat16) needs a loss scale, "
                         f"which widenet keeps only where every process holds the same gradients, not under "
                         f"{parallel.mode} parallelism; use --amp off (or bf16 where the GPU has it)")
    return torch.amp.GradScaler(device.type)


def apply_update(net: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                 parallel: ParallelContext | None = None, clip_norm: float | None = None, schedule=None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
    """One optimizer update from `loss`: backward, the parallel hooks and global-norm clipping (with a
    ParallelContext), the optimizer and the schedule. The one backward of every training step.
    With a scaler (float16): backward of the scaled loss, gradients unscaled before clipping, the
    step skipped if they overflowed, and the scale updated."""
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if parallel is not None:
        parallel.after_backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        parallel.clip_grad_norm(net, clip_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    if schedule is not None and scaler is None:
        schedule.step()
    elif schedule is not None:
        with warnings.catch_warnings():  # after a skipped first step torch warns that the schedule stepped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")  # first: as it should
            schedule.step()
