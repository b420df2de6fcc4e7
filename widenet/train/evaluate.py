"""Test-set evaluation: accuracy, loss and per-block routing statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import normalize
from ..data.vision import ImageDataset, iterate_batches
from ..runtime import autocast


@dataclass
class BlockRouting:
    """Routing of one MoE block over a whole evaluation."""

    block: int
    expert_fraction: list[float]
    dropped_fraction: float


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    examples: int
    routing: list[BlockRouting] = field(default_factory=list)

    def to_record(self) -> dict:
        return dict(accuracy=self.accuracy, loss=self.loss, examples=self.examples,
                    routing=[vars(r) for r in self.routing])


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset, batch_size: int, device: torch.device,
             mean: Sequence[float], std: Sequence[float], amp: torch.dtype | None = None) -> EvalResult:
    """Eval mode (no noise, no dropout, eval capacity), whole dataset in order."""
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    load: dict[int, torch.Tensor] = {}
    dropped: dict[int, float] = {}
    for images, labels in iterate_batches(data, batch_size, shuffle=False):
        x = normalize(images.to(device), mean, std)
        labels = labels.to(device)
        with autocast(device, amp):
            out = model(x)
        n = labels.numel()
        loss_sum += float(F.cross_entropy(out.logits.float(), labels, reduction="sum"))
        correct += int((out.logits.argmax(-1) == labels).sum())
        seen += n
        for block, stats in enumerate(out.routing):
            if stats is not None:  # weight by batch size: per-call fractions -> dataset fractions
                load[block] = load.get(block, 0) + stats.expert_fraction.float().cpu() * n
                dropped[block] = dropped.get(block, 0.0) + float(stats.dropped_fraction) * n
    model.train(was_training)
    routing = [BlockRouting(b, (load[b] / seen).tolist(), dropped[b] / seen) for b in sorted(load)]
    return EvalResult(correct / max(seen, 1), loss_sum / max(seen, 1), seen, routing)
