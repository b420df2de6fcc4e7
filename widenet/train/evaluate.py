"""Test-set evaluation: accuracy, loss and per-block routing statistics."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import normalize
from ..data.batches import num_batches
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
    """Per-block expert load and drop rate over many MoE calls, weighted by tokens (or examples). The
    sums stay on the MoE's device until read (blocks, flat): on a GPU no call waits for the device."""

    def __init__(self) -> None:
        self.load: dict[int, torch.Tensor] = {}
        self.dropped: dict[int, torch.Tensor | float] = {}
        self.dropped_assignments: dict[int, torch.Tensor | float] = {}
        self.weight = 0.0

    def add(self, routing: Sequence[RoutingStats | None], weight: float) -> None:
        """`routing`: one call's per-block stats; `weight`: how much this call counts."""
        self.weight += weight
        for block, stats in enumerate(routing):
            if stats is not None:  # per-call fractions -> fractions over everything seen
                self.load[block] = self.load.get(block, 0) + stats.expert_fraction.float() * weight
                self.dropped[block] = self.dropped.get(block, 0) + stats.dropped_fraction * weight
                self.dropped_assignments[block] = (self.dropped_assignments.get(block, 0)
                                                   + stats.dropped_assignment_fraction * weight)

    def blocks(self) -> list[BlockRouting]:
        host = self.filled(self.flat(), self.weight)  # (one copy from the device)
        w = max(self.weight, 1e-12)
        return [BlockRouting(b, (host.load[b] / w).tolist(), host.dropped[b] / w, host.dropped_assignments[b] / w)
                for b in sorted(host.load)]

    def flat(self) -> torch.Tensor:
        """The sums as one float64 vector on the host (to all-reduce): each block's load, then the blocks'
        dropped token fractions, then their dropped assignment fractions (all times their weights)."""
        blocks = sorted(self.load)
        if not blocks:
            return torch.zeros(0, dtype=torch.float64)
        device = self.load[blocks[0]].device
        drops = [torch.stack([torch.as_tensor(d[b], dtype=torch.float64, device=device) for b in blocks])
                 for d in (self.dropped, self.dropped_assignments)]
        return torch.cat([self.load[b].double().flatten() for b in blocks] + drops).cpu()

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


def summed_over_processes(t: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """A CPU tensor added over processes (itself on one process)."""
    if not parallel.distributed:
        return t
    on_backend = on_backend_device(t)
    all_reduce_sum(on_backend)
    return on_backend.cpu()


def summed_over_ranks(values: Sequence[float], routing: RoutingTally, parallel: ParallelContext
                      ) -> tuple[list[float], RoutingTally]:
    """Numbers and a routing tally added over processes, in one float64 all-reduce (every rank's tally
    has the same blocks: a padding pass adds its zero routing too)."""
    head = torch.tensor([*values, routing.weight], dtype=torch.float64)
    flat, n = summed_over_processes(torch.cat([head, routing.flat()]), parallel), len(values)
    return flat[:n].tolist(), routing.filled(flat[n + 1:], float(flat[n]))


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
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct, single_*: summed on the device
    for images, labels in batches:
        x = normalize(images.to(device), mean, std)
        labels = labels.to(device)
        with autocast(device, amp):
            out = model(x)
            views = (out.logits, model(x.flip(-1)).logits) if tta == "flip" else (out.logits,)
        sums.seen += labels.numel()
        both = _loss_and_correct(mean_of_views(*views), labels)
        totals += torch.cat([both, _loss_and_correct(mean_of_views(views[0]), labels) if len(views) > 1 else both])
        sums.routing.add(out.routing, labels.numel())  # weighted by batch size: per-call -> dataset fractions
    model.train(was_training)
    sums.loss, correct, sums.single_loss, single_correct = totals.tolist()
    sums.correct, sums.single_correct = round(correct), round(single_correct)
    return sums


def _loss_and_correct(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(2,) float64: summed NLL and number of correct argmax predictions of (B, K) log-probabilities."""
    return torch.stack([F.nll_loss(log_probs, labels, reduction="sum"),
                        (log_probs.argmax(-1) == labels).sum()]).double()


def evaluate_on(parallel: ParallelContext, model: nn.Module, data: ImageDataset, batch_size: int,
                device: torch.device, mean: Sequence[float], std: Sequence[float],
                amp: torch.dtype | None = None, tta: str = "none") -> EvalResult:
    """evaluate() on one process; on several, each rank's share of the batches (whole batches:
    ParallelContext.evaluation_share) with the sums all-reduced."""
    net = parallel.module(model)
    if not parallel.distributed:
        return evaluate(net, data, batch_size, device, mean, std, amp, tta)
    first, stop, padding = parallel.evaluation_share(num_batches(len(data), batch_size))
    mine = itertools.islice(iterate_batches(data, batch_size, shuffle=False, start_batch=first), stop - first)
    empty = [(data.images[:0], data.labels[:0])] * padding
    sums = evaluation_sums(net, itertools.chain(mine, empty), device, mean, std, amp, tta)
    return _all_reduce_sums(sums, parallel).result()


def _all_reduce_sums(sums: EvalSums, parallel: ParallelContext) -> EvalSums:
    """EvalSums summed over ranks."""
    values, routing = summed_over_ranks([sums.loss, sums.correct, sums.seen, sums.single_loss, sums.single_correct],
                                        sums.routing, parallel)
    loss, correct, seen, single_loss, single_correct = values
    return EvalSums(loss=loss, correct=round(correct), seen=round(seen), single_loss=single_loss,
                    single_correct=round(single_correct), routing=routing, tta=sums.tta)
