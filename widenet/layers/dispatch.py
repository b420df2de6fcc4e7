"""MoE dispatch: where each assignment goes, and gather -> experts -> combine as autograd nodes.

plan_dispatch sorts the assignments by expert on the device and orders the
rows of the expert buffer with static shapes (kept assignments grouped by
expert, then dropped ones and padding); RoutedExperts gathers each row's
token, runs the experts' kernel (layers/experts.py), scales by the combine
weight and reads the rows back in assignment order through the inverse
permutation: a gather in every direction, no scatter-add. GatherTokens and
Combine are the same two steps apart, for an expert-parallel layer.
Axes as in layers/moe.py (N tokens, D width, E experts, K choices, A = K*N
assignments, M kept assignments).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .experts import cast, ffn_backward, ffn_forward, row_layout

__all__ = ["Combine", "DispatchPlan", "GatherTokens", "RoutedExperts", "plan_dispatch"]


@dataclass
class DispatchPlan:
    """Where the A assignments of one call go (device tensors; shapes fixed by N, K, E).

    slot: (A,) the assignment held by each row of the expert buffer: kept
        assignments grouped by expert (priority order within each), then the
        dropped ones and padding.
    inverse: (A,) each assignment's row (the inverse permutation of slot).
    counts: (E,) assignments per expert before dropping (padding excluded).
    kept: (E,) rows per expert after dropping; M = kept.sum().
    row_expert: (A,) each row's expert, E for rows past the kept ones
        (None from a host plan).
    runs: kept on the host (a host plan only; the loop kernel needs it).
    """

    slot: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor
    kept: torch.Tensor
    row_expert: torch.Tensor | None = None
    runs: list[int] | None = None


def plan_dispatch(expert_index: torch.Tensor, counts: torch.Tensor, capacity: int | torch.Tensor,
                  valid: torch.Tensor | None = None, dropless: bool = False, host: bool = False) -> DispatchPlan:
    """Sort the assignments of expert_index (K, N) by expert, keep the first `capacity` of
    each expert, and order the rows of the expert buffer (see DispatchPlan).

    counts: (E,) assignments per expert (the router's; padding excluded).
    valid: (N,) bool, False for padding (a pseudo-expert E: sorted last, never kept).
    dropless: capacity is known to exceed every count (then one sort suffices).
    host: read the counts on the host and cut the runs there (the loop kernel needs
        them anyway; on a CPU this is the cheaper way). capacity must then be an int.
    """
    k, n = expert_index.shape
    a, e = n * k, counts.shape[0]
    device = expert_index.device
    expert_of = expert_index.reshape(-1)  # (A,) choice-major
    if valid is not None:
        expert_of = torch.where(valid.repeat(k), expert_of, e)
    sorted_expert, order = torch.sort(expert_of, stable=True)  # (A,), (A,): grouped by expert
    arange = torch.arange(a, device=device)
    if host:
        return _cut_on_host(order, counts, capacity, arange)
    if dropless:
        row_expert, slot, kept = sorted_expert, order, counts
    else:
        kept = counts.clamp(max=capacity)  # (E,)
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # (E+1,) run starts (E: padding)
        position = arange - starts[sorted_expert]  # (A,) place in its expert's run
        row_expert, row = torch.sort(torch.where(position < capacity, sorted_expert, e), stable=True)
        slot = order.index_select(0, row)  # (A,)
    inverse = torch.empty_like(slot).scatter_(0, slot, arange)  # (A,)
    return DispatchPlan(slot, inverse, counts, kept, row_expert)


def _cut_on_host(order: torch.Tensor, counts: torch.Tensor, capacity: int, arange: torch.Tensor) -> DispatchPlan:
    """The host form of plan_dispatch: order (A,) sorted by expert, counts (E,)."""
    counts_list = counts.tolist()
    runs = [min(c, capacity) for c in counts_list]
    slot = order
    if runs != counts_list:  # kept heads of the runs first, then their dropped tails, then padding
        starts = list(itertools.accumulate(counts_list, initial=0))
        kept = [order[s:s + r] for s, r in zip(starts, runs)]
        dropped = [order[s + r:s + c] for s, r, c in zip(starts, runs, counts_list)]
        slot = torch.cat([*kept, *dropped, order[starts[-1]:]])
    inverse = torch.empty_like(slot).scatter_(0, slot, arange)
    return DispatchPlan(slot, inverse, counts, torch.tensor(runs, device=order.device), runs=runs)


# ----------------------------------------------------------------------------
# Autograd nodes: gather -> experts -> combine
# ----------------------------------------------------------------------------
def _rows_to_tokens(rows: torch.Tensor, inverse: torch.Tensor, k: int, n: int,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows (A, D) of the expert buffer, times weight (A,) by assignment when given, summed per
    token: (N, D). Each assignment's row is read through the inverse permutation (a gather);
    the K choices are added with plain adds (CUDA autocast runs .sum in float32, which turned
    a bf16 output into float32)."""
    parts = rows.index_select(0, inverse)  # (A, D) in assignment order
    if weight is not None:
        parts.mul_(cast(weight, parts.dtype).unsqueeze(1))
    parts = parts.view(k, n, -1)  # (K, N, D)
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


class RoutedExperts(torch.autograd.Function):
    """out[n] = sum over kept assignments a of token n: weight[a] * FFN_e(a)(x[n]).

    x: (N, D); weight: (A,) combine weights by assignment; slot, inverse,
    row_expert (A,) and kept (E,) from plan_dispatch; w1, b1, w2, b2 the
    experts' weights; kernel, runs, slots: see layers/experts.py; approximate: the GELU's.
    """

    @staticmethod
    def forward(ctx, x, weight, slot, inverse, row_expert, kept, w1, b1, w2, b2,
                kernel: str, runs: tuple[int, ...] | None, slots: int, k: int, approximate: str = "none"):
        n, a = x.shape[0], slot.shape[0]
        token = slot if k == 1 else slot % n  # (A,) each row's token
        rows = x.index_select(0, token)  # (A, D)
        lay = row_layout(kernel, kept, a, runs, row_expert, slots, approximate)
        y, saved = ffn_forward(rows, w1, b1, w2, b2, lay)  # (A, D), zero past M
        ctx.save_for_backward(rows, w1, w2, y, weight, slot, token, inverse, *lay.tensors(), *saved)
        ctx.lay, ctx.k = lay.without_tensors(), k
        return _rows_to_tokens(y, inverse, k, n, weight)  # (N, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # grad: (N, D)
        rows, w1, w2, y, weight, slot, token, inverse, *rest = ctx.saved_tensors
        g = grad.contiguous().index_select(0, token)  # (A, D)
        g_weight = cast(torch.linalg.vecdot(g, y).index_select(0, inverse), weight.dtype)  # (A,); 0 if dropped
        g.mul_(cast(weight.index_select(0, slot), g.dtype).unsqueeze(1))  # gradient of the expert outputs
        lay, saved = ctx.lay.restored(rest)
        g_rows, gw1, gb1, gw2, gb2 = ffn_backward(g, rows, w1, w2, saved, lay)
        g_x = _rows_to_tokens(g_rows, inverse, ctx.k, grad.shape[0])  # (N, D)
        return g_x, g_weight, None, None, None, None, gw1, gb1, gw2, gb2, None, None, None, None, None


class GatherTokens(torch.autograd.Function):
    """x (N, D) -> rows x[slot % N] (M, D): each kept assignment's token.

    A token can appear K times, so backward places each row's gradient at its
    assignment id in a (K*N, D) buffer and sums over K: no scatter-add.
    """

    @staticmethod
    def forward(ctx, x, slot, k: int):
        ctx.save_for_backward(slot)
        ctx.k, ctx.n = k, x.shape[0]
        return x.index_select(0, slot % ctx.n)

    @staticmethod
    def backward(ctx, grad):  # grad: (M, D)
        (slot,) = ctx.saved_tensors
        return _sum_at_tokens(grad, slot, ctx.k, ctx.n), None, None


def _sum_at_tokens(src: torch.Tensor, slot: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Rows src (M, D) of assignments slot (M,) summed per token: (N, D), zeros where none."""
    parts = src.new_zeros(k * n, src.shape[1]).index_copy_(0, slot, src).view(k, n, -1)
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


class Combine(torch.autograd.Function):
    """out[n] = sum over kept assignments a of token n: weight[a] * y[row of a].

    y: (M, D) expert outputs in slot order; weight: (A,) combine weights by
    assignment id; slot: (M,) assignment ids. Dropped assignments add nothing.
    """

    @staticmethod
    def forward(ctx, y, weight, slot, k: int, n: int):
        w = weight.index_select(0, slot).to(y.dtype).unsqueeze(1)  # (M, 1)
        out = _sum_at_tokens(y * w, slot, k, n)  # (N, D)
        ctx.save_for_backward(y, weight, slot)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, grad):  # grad: (N, D)
        y, weight, slot = ctx.saved_tensors
        g = grad.index_select(0, slot % ctx.n)  # (M, D)
        w = weight.index_select(0, slot).to(y.dtype).unsqueeze(1)  # (M, 1)
        grad_w = weight.new_zeros(weight.shape).index_copy_(0, slot, torch.linalg.vecdot(g, y).to(weight.dtype))
        return g * w, grad_w, None, None, None
