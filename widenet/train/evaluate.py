"""Test-set evaluation: accuracy, loss and per-block routing statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import normalize
from ..data.images import ImageDataset, iterate_batches
from ..distributed.env import all_reduce_sum
from ..distributed.parallel import ParallelContext, on_backend_device
from ..layers.moe import RoutingStats
from ..runtime import autocast
from .config import TTA_NAMES


@dataclass
class BlockRouting:
    """Routing of one MoE block over a whole evaluation."""

    block: int
    expert_fraction: list[float]
    dropped_fraction: float  # of the tokens: those that lost every assignment (no expert output)
    dropped_assignment_fraction: float | None = None  # of the (token, expert) assignments; None: not recorded


@dataclass
class EvalResult:
    """accuracy, loss: of the predictions (with test-time augmentation, of the averaged views);
    single_accuracy, single_loss: of the plain images alone, set only under test-time augmentation."""

    accuracy: float
    loss: float
    examples: int
    routing: list[BlockRouting] = field(default_factory=list)
    single_accuracy: float | None = None
    single_loss: float | None = None

    def to_record(self) -> dict:
        single = {} if self.single_accuracy is None else dict(single_accuracy=self.single_accuracy,
                                                               single_loss=self.single_loss)
        return dict(accuracy=self.accuracy, loss=self.loss, examples=self.examples, **single,
                    routing=[vars(r) for r in self.routing])


def drop_note(record: dict) -> str:
    """What an evaluation's log line adds when its MoE dropped most of some block's tokens (over the
    experts' capacity a token gets no expert output, only its residual): "; note: ...", else ""."""
    worst = max((r["dropped_fraction"] for r in record.get("routing", ())), default=0.0)
    if worst <= 0.5:
        return ""
    return (f"; note: the MoE dropped {worst:.0%} of a block's tokens (over the experts' capacity a token gets no "
            "expert output): raise --eval-capacity-factor (or --capacity-factor), or use --dropless")


def dropped_text(block: Mapping[str, Any]) -> str:
    """A block's drops as a report says them (a BlockRouting's fields): "0.002 of tokens, 0.029 of
    assignments" (with top-2 routing a token over one expert's capacity keeps its other expert)."""
    tokens, assignments = block["dropped_fraction"], block.get("dropped_assignment_fraction")
    return f"{tokens:.3f} of tokens" + ("" if assignments is None else f", {assignments:.3f} of assignments")


class RoutingTally:
    """Per-block expert load and drop rate over many MoE calls, weighted by tokens (or examples)."""

    def __init__(self) -> None:
        self.load: dict[int, torch.Tensor] = {}
        self.dropped: dict[int, float] = {}
        self.dropped_assignments: dict[int, float] = {}
        self.weight = 0.0

    def add(self, routing: Sequence[RoutingStats | None], weight: float) -> None:
        """`routing`: one call's per-block stats; `weight`: how much this call counts."""
        self.weight += weight
        for block, stats in enumerate(routing):
            if stats is not None:  # per-call fractions -> fractions over everything seen
                self.load[block] = self.load.get(block, 0) + stats.expert_fraction.float().cpu() * weight
                self.dropped[block] = self.dropped.get(block, 0.0) + float(stats.dropped_fraction) * weight
                self.dropped_assignments[block] = (self.dropped_assignments.get(block, 0.0)
                                                   + float(stats.dropped_assignment_fraction) * weight)

    def blocks(self) -> list[BlockRouting]:
        w = max(self.weight, 1e-12)
        return [BlockRouting(b, (self.load[b] / w).tolist(), self.dropped[b] / w, self.dropped_assignments[b] / w)
                for b in sorted(self.load)]

    def flat(self) -> torch.Tensor:
        """The sums as one float64 vector (to all-reduce): each block's load, then the blocks' dropped
        token fractions, then their dropped assignment fractions (all times their weights)."""
        blocks = sorted(self.load)
        return torch.cat([self.load[b].double().flatten() for b in blocks]
                         + [torch.tensor([drops[b] for b in blocks], dtype=torch.float64)
                            for drops in (self.dropped, self.dropped_assignments)])

    def filled(self, flat: torch.Tensor, weight: float) -> RoutingTally:
        """A tally of this one's blocks holding `flat` (a vector laid out as flat() lays out this one's,
        e.g. summed over processes) and `weight`."""
        out, blocks, offset = RoutingTally(), sorted(self.load), 0
        out.weight = weight
        for b in blocks:
            out.load[b] = flat[offset:offset + self.load[b].numel()].float()
            offset += self.load[b].numel()
        for drops in (out.dropped, out.dropped_assignments):
            drops.update((b, float(flat[offset + i])) for i, b in enumerate(blocks))
            offset += len(blocks)
        return out


@dataclass
class EvalSums:
    """Running sums of an evaluation (summed over batches, or over ranks with all_reduce).

    loss, correct, seen: scalars; single_loss, single_correct: the same for the
    plain images alone (equal to loss, correct without test-time augmentation);
    routing: each MoE block's load and drops, weighted by batch size.
    """

    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    single_loss: float = 0.0
    single_correct: int = 0
    routing: RoutingTally = field(default_factory=RoutingTally)
    tta: str = "none"

    def result(self) -> EvalResult:
        seen = max(self.seen, 1)
        result = EvalResult(self.correct / seen, self.loss / seen, self.seen, self.routing.blocks())
        if self.tta != "none":
            result.single_accuracy, result.single_loss = self.single_correct / seen, self.single_loss / seen
        return result


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset, batch_size: int, device: torch.device,
             mean: Sequence[float], std: Sequence[float], amp: torch.dtype | None = None,
             tta: str = "none") -> EvalResult:
    """Eval mode (no noise, no dropout, eval capacity), whole dataset in order."""
    batches = iterate_batches(data, batch_size, shuffle=False)
    return evaluation_sums(model, batches, device, mean, std, amp, tta).result()


def mean_of_views(*logits: torch.Tensor) -> torch.Tensor:
    """Log of the class probabilities averaged over views: (B, K) logits each -> (B, K) float32
    log-probabilities. One view gives its log-softmax."""
    log_probs = torch.stack([v.float().log_softmax(-1) for v in logits])  # (V, B, K)
    return torch.logsumexp(log_probs, 0) - math.log(len(logits))


@torch.no_grad()
def evaluation_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device, mean: Sequence[float], std: Sequence[float],
                    amp: torch.dtype | None = None, tta: str = "none") -> EvalSums:
    """Sums of loss, correct predictions and routing over (uint8 images, labels) batches, in eval mode.

    tta="flip": predictions average the class probabilities of each image and its mirror image
    (test-time augmentation, twice the compute); routing and the single_* sums are the
    unflipped images'.
    """
    if tta not in TTA_NAMES:
        raise ValueError(f"tta must be one of {', '.join(TTA_NAMES)}, got {tta!r}")
    was_training = model.training
    model.eval()
    sums = EvalSums(tta=tta)
    for images, labels in batches:
        x = normalize(images.to(device), mean, std)
        labels = labels.to(device)
        with autocast(device, amp):
            out = model(x)
            views = (out.logits, model(x.flip(-1)).logits) if tta == "flip" else (out.logits,)
        n = labels.numel()
        sums.seen += n
        loss, correct = _loss_and_correct(mean_of_views(*views), labels)
        sums.loss += loss
        sums.correct += correct
        if len(views) > 1:
            loss, correct = _loss_and_correct(mean_of_views(views[0]), labels)
        sums.single_loss += loss
        sums.single_correct += correct
        sums.routing.add(out.routing, n)  # weighted by batch size: per-call fractions -> dataset fractions
    model.train(was_training)
    return sums


def _loss_and_correct(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed NLL and number of correct argmax predictions of (B, K) log-probabilities."""
    return float(F.nll_loss(log_probs, labels, reduction="sum")), int((log_probs.argmax(-1) == labels).sum())


def evaluate_on(parallel: ParallelContext, model: nn.Module, data: ImageDataset, batch_size: int,
                device: torch.device, mean: Sequence[float], std: Sequence[float],
                amp: torch.dtype | None = None, tta: str = "none") -> EvalResult:
    """evaluate() on one process; on several, each rank's slices of every batch with the sums
    all-reduced (needed anyway when the forward communicates: FSDP, expert parallel)."""
    net = parallel.module(model)
    if not parallel.distributed:
        return evaluate(net, data, batch_size, device, mean, std, amp, tta)
    batches = ((parallel.shard(x), parallel.shard(y)) for x, y in iterate_batches(data, batch_size, shuffle=False))
    return _all_reduce_sums(evaluation_sums(net, batches, device, mean, std, amp, tta)).result()


def _all_reduce_sums(sums: EvalSums) -> EvalSums:
    """EvalSums summed over ranks (every rank saw the same MoE blocks)."""
    head = torch.tensor([sums.loss, sums.correct, sums.seen, sums.single_loss, sums.single_correct],
                        dtype=torch.float64)
    flat = on_backend_device(torch.cat([head, sums.routing.flat()]))
    all_reduce_sum(flat)
    flat = flat.cpu()
    seen = int(round(float(flat[2])))
    return EvalSums(loss=float(flat[0]), correct=int(round(float(flat[1]))), seen=seen, single_loss=float(flat[3]),
                    single_correct=int(round(float(flat[4]))), routing=sums.routing.filled(flat[5:], seen),
                    tta=sums.tta)
