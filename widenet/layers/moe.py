"""Mixture-of-experts layer: router -> dispatch plan -> experts -> combine.

WideNet (Xue et al., AAAI 2022, arXiv 2107.11817) routes every token to the
top-k of E experts, g(x) = TopK(softmax(f(x) + eps)), with a per-expert
capacity and the load-balancing loss l = E * sum_i m_i * P_i.

Axis legend used in shape comments:
    B  batch             T  tokens per sequence
    N  tokens in this call (B*T, padding included)
    D  model width       H  expert hidden width
    E  experts           K  choices per token (top-k)
    A  assignments = K*N (choice-major: all 1st choices, then all 2nd, ...)
    M  kept assignments (a count on the device, never a shape)

Every shape depends on N, K and E only, and nothing waits for the device
(except the "loop" kernel, which reads the run lengths on the host: free on
a CPU), so the layer runs inside torch.compile(fullgraph=True):

0. Router computes expert-major logits (E, N), the noisy softmax over E, the
   top-k, the counts per expert and the balance (and z-) loss, as one
   autograd node with a hand-written backward (_RouterGate).
1. plan_dispatch sorts the assignments by expert (a stable sort, so priority
   follows the choice-major order: every token's first choice beats any
   second choice, earlier tokens beat later ones), keeps the first
   `capacity` of each expert, and orders the A rows of the expert buffer:
   kept assignments grouped by expert, then the dropped ones and padding.
2. _RoutedExperts gathers each row's token, runs the experts on their runs of
   rows (layers/experts.py: per-expert loop, grouped matmuls or padded
   batched matmuls), scales by the combine weight, and reads the rows back
   in assignment order through the inverse permutation, summing over K: a
   gather in every direction, no scatter-add and no tokens x experts x
   capacity tensor, in one autograd node with a hand-written backward.

Padding tokens (padding_mask) become assignments of a pseudo-expert E: they
sort last, take no capacity, get zero output and take no part in the losses.
An expert-parallel layer (local_experts = False) keeps gather, experts and
combine apart (_GatherTokens, its own expert step, _Combine) to send rows
between ranks; it reads the run lengths on the host for the split sizes.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .experts import EXPERT_BACKENDS, Experts, cast, ffn_backward, ffn_forward, grouped_mm_works, row_layout

__all__ = ["MoE", "MoEOutput", "RoutingStats", "Router", "RouterOutput", "Experts", "EXPERT_BACKENDS",
           "DispatchPlan", "grouped_mm_works", "plan_dispatch",
           "expert_capacity", "load_balancing_loss", "router_z_loss"]


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------
class RoutingStats:
    """What one MoE call did with its tokens (padding excluded; all tensors detached).

    expert_fraction: (E,) fraction of the top-k assignments (before dropping)
        that chose each expert; sums to 1.
    dropped_fraction: () fraction of tokens that lost every assignment to
        capacity and got no expert output.
    dropped_assignment_fraction: () fraction of assignments dropped.
    balance_loss, z_loss: () the unweighted loss terms.

    Each is computed on first access from tensors the call left behind
    (counts and kept rows per expert; for top-k > 1 each assignment's row;
    the logits when the z-loss was not trained), so a training step that
    never reads them does not pay for them.
    """

    def __init__(self, counts: torch.Tensor, kept: torch.Tensor, balance_loss: torch.Tensor,
                 z_loss: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None, inverse: torch.Tensor | None = None, top_k: int = 1,
                 num_valid: int | torch.Tensor = 1) -> None:
        self._counts, self._kept, self._num_valid = counts, kept, num_valid
        self._inverse, self._top_k = inverse, top_k  # (A,) each assignment's row (read for top-k > 1)
        self._logits, self._valid = logits, valid  # (E, N), (N,): the z-loss when it was not given
        self.balance_loss = balance_loss.detach()
        if z_loss is not None:
            self.z_loss = z_loss.detach()

    @classmethod
    def empty(cls, num_experts: int, device: torch.device) -> RoutingStats:
        """The statistics of a call without tokens: all zero."""
        zeros = torch.zeros(num_experts, dtype=torch.long, device=device)
        zero = torch.zeros((), device=device)
        return cls(zeros, zeros, zero, zero)

    @functools.cached_property
    def expert_fraction(self) -> torch.Tensor:
        return self._counts / self._counts.sum().clamp(min=1)

    @functools.cached_property
    def dropped_assignment_fraction(self) -> torch.Tensor:
        assignments = self._counts.sum()
        return ((assignments - self._kept.sum()) / assignments.clamp(min=1)).float()

    @functools.cached_property
    def dropped_fraction(self) -> torch.Tensor:
        if self._top_k == 1:  # a dropped assignment is a dropped token
            return self.dropped_assignment_fraction
        # A token is served when any of its K assignments sits in a kept row (padding: never).
        served = (self._inverse < self._kept.sum()).view(self._top_k, -1).any(0).sum()
        return ((self._num_valid - served) / _at_least_one(self._num_valid)).float()

    @functools.cached_property
    def z_loss(self) -> torch.Tensor:
        return router_z_loss(self._logits, self._valid, dim=0).detach()

    def __repr__(self) -> str:
        return (f"RoutingStats(expert_fraction={self.expert_fraction}, dropped_fraction={self.dropped_fraction}, "
                f"balance_loss={self.balance_loss}, z_loss={self.z_loss})")


@dataclass
class MoEOutput:
    """output: same shape as the input; aux_loss: () = balance + z_weight * z."""

    output: torch.Tensor
    aux_loss: torch.Tensor
    stats: RoutingStats


@dataclass
class RouterOutput:
    """The router's decision, expert-major and choice-major: softmax and top-k run along
    the contiguous token axis (~10x faster on a CPU at small E than along E), and
    expert_index.reshape(-1) is the assignment order a = choice * N + token.

    combine_weight, balance_loss and z_loss carry gradients (to the router's
    weight and the tokens); logits, probs and counts are records."""

    logits: torch.Tensor      # (E, N) float32, noise included when training
    probs: torch.Tensor       # (E, N) float32 softmax of logits over E
    expert_index: torch.Tensor  # (K, N) int64, best first
    combine_weight: torch.Tensor  # (K, N) float32
    counts: torch.Tensor      # (E,) int64 assignments per expert (padding excluded)
    balance_loss: torch.Tensor  # () E * sum_i m_i * P_i over the non-padding tokens
    z_loss: torch.Tensor | None = None  # () when asked for (router_z_loss)


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


# ----------------------------------------------------------------------------
# Pure functions (each tested on its own)
# ----------------------------------------------------------------------------
def expert_capacity(num_tokens: int | torch.Tensor, num_experts: int, top_k: int,
                    factor: float) -> int | torch.Tensor:
    """Slots per expert per call: ceil(factor * k * N / E); an int, or a () int64
    tensor for a token count held on the device (padding masks).

    Rounded to 9 decimals before the ceiling so that decimal factors give the
    exact answer (1.1 * 100 / 2 is 55.00000000000001 in floating point).
    """
    if isinstance(num_tokens, torch.Tensor):
        share = num_tokens.double() * (factor * top_k) / num_experts
        return torch.ceil(torch.round(share, decimals=9)).long()
    return math.ceil(round(factor * top_k * num_tokens / num_experts, 9))


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E * sum_i m_i * P_i (Switch/GShard; WideNet eq. for l_balance).

    probs: (N, E) router probabilities; expert_index: (N, K) chosen experts.
    m_i counts every top-k assignment (before capacity dropping).
    """
    counts = F.one_hot(expert_index.reshape(-1), num_experts).sum(0)  # (E,)
    return _balance_loss(probs.t(), counts, expert_index.shape[1], expert_index.shape[0])


def _balance_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int, num_valid: int | torch.Tensor,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_i m_i * P_i from counts (E,) of assignments, over the valid tokens of probs (E, N)."""
    if valid is None:
        p = probs.mean(dim=1)  # (E,)
    else:
        p = (probs * valid).sum(dim=1) / _at_least_one(num_valid)
    m = counts.to(probs.dtype) / _at_least_one(top_k * num_valid)
    return probs.shape[0] * torch.dot(m, p)


def router_z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (valid) tokens of logsumexp(logits)^2, the
    logsumexp taken over the experts' dim of logits."""
    return _masked_mean(torch.logsumexp(logits, dim=dim).pow(2), valid, None if valid is None else valid.sum())


def _masked_mean(values: torch.Tensor, valid: torch.Tensor | None, num_valid: int | torch.Tensor | None
                 ) -> torch.Tensor:
    """Mean of values (N,) over the valid entries."""
    return values.mean() if valid is None else (values * valid).sum() / _at_least_one(num_valid)


def _at_least_one(n: int | torch.Tensor) -> int | torch.Tensor:
    return n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1)


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
# Modules
# ----------------------------------------------------------------------------
class Router(nn.Module):
    """Linear D -> E without bias, in float32 (float64 for float64 input), noisy top-k softmax
    gate; also the load-balancing loss (and the z-loss when asked) of the same probabilities.

    forward(x (N, D), valid (N,) bool or None, with_z_loss) -> RouterOutput. The whole
    router is one autograd node with a hand-written backward (_RouterGate): at small
    widths on a CPU, a dozen autograd nodes cost as much as the router's arithmetic.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, noise_std: float,
                 renormalize: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim ** -0.5)
        self.top_k = top_k
        self.noise_std = noise_std
        self.renormalize = renormalize

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None,
                with_z_loss: bool = False) -> RouterOutput:  # x: (N, D)
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 if asked
            num_valid = x.shape[0] if valid is None else valid.sum()
            noise = self.noise_std if self.training else 0.0
            outputs = _RouterGate.apply(cast(x, dtype), cast(self.weight, dtype), valid, num_valid, noise,
                                        self.top_k, self.renormalize, with_z_loss)
        weight, index, balance, z, counts, logits, probs = outputs
        return RouterOutput(logits, probs, index, weight, counts, balance, z if with_z_loss else None)


class _RouterGate(torch.autograd.Function):
    """logits = W x^T (+ noise) -> probs = softmax over E -> top-k gate weights; the balance
    loss (and z-loss) from the same probabilities. Shapes: x (N, D), W (E, D), logits and
    probs (E, N), gate and index (K, N), counts (E,).

    Backward, from the gradients of the gate weights, the balance loss and the z-loss:
        d probs = scatter of d gate at the chosen experts (renormalised: through w / sum w)
                  + d balance * E * m_e * valid_n / N_valid
        d logits = probs * (d probs - sum_e probs * d probs) + d z * 2 lse_n valid_n / N_valid * probs
        d W = d logits @ x,   d x = d logits^T @ W
    """

    @staticmethod
    def forward(ctx, x, weight, valid, num_valid, noise_std: float, top_k: int, renormalize: bool, with_z: bool):
        e = weight.shape[0]
        logits = weight @ x.t()  # (E, N)
        if noise_std > 0:
            logits.add_(torch.randn_like(logits), alpha=noise_std)
        probs = logits.softmax(dim=0)  # (E, N)
        if top_k == 1:  # max is ~3x cheaper than topk on CPU
            gate, index = (t.unsqueeze(0) for t in probs.max(dim=0))  # (1, N) each
        else:
            gate, index = probs.topk(top_k, dim=0)  # (K, N) each
        expert_of = index.reshape(-1)  # (A,)
        if valid is not None:
            expert_of = torch.where(valid.repeat(top_k), expert_of, e)  # padding: pseudo-expert E
        counts = torch.zeros(e + 1, dtype=torch.long, device=x.device)
        counts = counts.scatter_add_(0, expert_of, torch.ones_like(expert_of))[:e]  # (E,)
        balance = _balance_loss(probs, counts, top_k, num_valid, valid)
        lse = torch.logsumexp(logits, dim=0) if with_z else None  # (N,)
        z = _masked_mean(lse.square(), valid, num_valid) if with_z else balance.new_zeros(())
        combine = gate / gate.sum(dim=0, keepdim=True) if renormalize else gate
        ctx.save_for_backward(x, weight, probs, index, gate, combine, counts, lse, valid)
        ctx.num_valid, ctx.top_k, ctx.renormalize = num_valid, top_k, renormalize
        ctx.mark_non_differentiable(index, counts, logits, probs)
        return combine, index, balance, z, counts, logits, probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_combine, _g_index, g_balance, g_z, _g_counts, _g_logits, _g_probs):
        x, weight, probs, index, gate, combine, counts, lse, valid = ctx.saved_tensors
        e, nv = probs.shape[0], _at_least_one(ctx.num_valid)
        g_probs = torch.zeros_like(probs)  # (E, N)
        if g_combine is not None:
            if ctx.renormalize:  # combine = gate / sum(gate)
                g_combine = (g_combine - (g_combine * combine).sum(0, keepdim=True)) / gate.sum(0, keepdim=True)
            g_probs.scatter_(0, index, g_combine)  # the K chosen experts of a token are distinct
        if g_balance is not None:
            m = counts.to(probs.dtype) / _at_least_one(ctx.top_k * ctx.num_valid)  # (E,)
            d_probs = (g_balance * e / nv * m).unsqueeze(1)  # (E, 1): d balance / d probs[i, n] = E m_i / N_valid
            g_probs += d_probs if valid is None else d_probs * valid
        g_logits = probs * (g_probs - (probs * g_probs).sum(0, keepdim=True))  # softmax backward
        if lse is not None and g_z is not None:
            dz = g_z * 2.0 / nv * lse  # (N,): d z / d lse_n
            g_logits += probs * (dz if valid is None else dz * valid)
        return g_logits.t() @ weight, g_logits @ x, None, None, None, None, None, None


class MoE(nn.Module):
    """Mixture-of-experts FFN with noisy top-k routing (WideNet, Sec. 3.1).

    Args:
        dim: token width D.  hidden_dim: expert hidden width H.
        num_experts: E.  top_k: K choices per token.
        capacity_factor: C for training; capacity = ceil(C * K * N / E).
        eval_capacity_factor: C in eval mode (None: same as training).
        noise_std: std of Gaussian noise on router logits while training
            (None: 1/E as the authors' code; 0 disables).
        dropless: never drop an assignment (capacity ignored).
        renormalize: divide combine weights by their sum over the K choices.
        z_loss_weight: weight of the router z-loss inside aux_loss.
        expert_backend: "auto", "loop", "grouped" or "padded" (see Experts).

    forward(x, padding_mask=None) takes x of shape (B, T, D) or (N, D) and a
    boolean padding_mask of shape x.shape[:-1], True where a token is padding.
    Padding takes no part in routing, capacity or the losses, and gets zero
    output. Returns MoEOutput(output, aux_loss, stats).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int = 2,
                 capacity_factor: float = 1.2, eval_capacity_factor: float | None = None,
                 noise_std: float | None = None, dropless: bool = False,
                 renormalize: bool = False, z_loss_weight: float = 0.0,
                 expert_backend: str = "auto") -> None:
        super().__init__()
        _check_moe_args(dim, hidden_dim, num_experts, top_k, capacity_factor,
                        eval_capacity_factor, noise_std, z_loss_weight)
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.dropless = dropless
        self.z_loss_weight = z_loss_weight
        noise = 1.0 / num_experts if noise_std is None else noise_std
        self.router = Router(dim, num_experts, top_k, noise, renormalize)
        self.experts = Experts(num_experts, dim, hidden_dim, expert_backend)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, experts={self.num_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}, dropless={self.dropless}")

    def capacity(self, num_tokens: int | torch.Tensor) -> int | torch.Tensor:
        """Slots per expert for a call with num_tokens routed (non-padding) tokens."""
        if self.dropless:
            return self.top_k * num_tokens
        factor = self.capacity_factor
        if not self.training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, self.top_k, factor)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> MoEOutput:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoE expects token dimension {self.dim}, got input of shape {tuple(x.shape)}")
        if padding_mask is not None and padding_mask.shape != x.shape[:-1]:
            raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} does not match "
                             f"tokens {tuple(x.shape[:-1])}")
        flat = x.reshape(-1, self.dim)  # (N, D)
        valid = None if padding_mask is None else padding_mask.reshape(-1) == 0  # (N,); 0/1 masks as False/True
        out, aux, stats = self._route_and_compute(flat, valid)
        return MoEOutput(out.reshape(x.shape), aux, stats)

    # -- internals -----------------------------------------------------------
    def _route_and_compute(self, x: torch.Tensor, valid: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor, RoutingStats]:
        """x (N, D), valid (N,) or None -> output (N, D), aux loss, statistics."""
        n, e = x.shape[0], self.num_experts
        if n == 0:
            stats = RoutingStats.empty(e, x.device)
            return x.new_zeros(0, self.dim), 0.0 * self.router.weight.sum(), stats

        with_z = self.z_loss_weight > 0
        route = self.router(x, valid, with_z)
        experts = self.experts
        dtype = experts.compute_dtype(x.device)
        kernel = experts.kernel(x.device, dtype, self.dropless) if self.local_experts else "loop"
        host = kernel == "loop"  # the loop kernel reads the run lengths on the host
        num_valid = n if valid is None else (int(valid.sum()) if host else valid.sum())
        plan = plan_dispatch(route.expert_index, route.counts, self.capacity(num_valid), valid, self.dropless,
                             host)
        balance = route.balance_loss
        aux = balance + self.z_loss_weight * route.z_loss if with_z else balance
        stats = RoutingStats(plan.counts, plan.kept, balance, route.z_loss, route.logits, valid, plan.inverse,
                             self.top_k, num_valid)  # the z-loss computed from the logits if read

        weight = route.combine_weight.reshape(-1)  # (A,) choice-major, like the assignment ids
        if self.local_experts:  # gather, experts and combine in one autograd node
            slots = self.capacity(n) if kernel == "padded" else 0  # static: every token counted
            out = _RoutedExperts.apply(cast(x, dtype), weight, plan.slot, plan.inverse, plan.row_expert, plan.kept,
                                       *experts.weights_in(dtype), kernel, plan.runs, slots, self.top_k)
        else:
            kept_ids = plan.slot[:sum(plan.runs)]  # (M,)
            y = self._run_experts(_GatherTokens.apply(x, kept_ids, self.top_k), plan.runs)  # (M, D)
            out = _Combine.apply(y, weight, kept_ids, self.top_k, n)  # (N, D)
        return out, aux, stats

    # Whether self.experts computes every expert here; then gather, experts and
    # combine run as one fused step. An expert-parallel subclass sets False.
    local_experts = True

    def _run_experts(self, rows: torch.Tensor, runs: list[int]) -> torch.Tensor:
        """rows: (M, D) grouped by expert in runs (E,) -> outputs (M, D), same order.

        The one step an expert-parallel subclass replaces (send the runs to
        the ranks owning their experts and bring the results back).
        """
        return self.experts(rows, runs)

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


class _RoutedExperts(torch.autograd.Function):
    """out[n] = sum over kept assignments a of token n: weight[a] * FFN_e(a)(x[n]).

    x: (N, D); weight: (A,) combine weights by assignment; slot, inverse,
    row_expert (A,) and kept (E,) from plan_dispatch; w1, b1, w2, b2 the
    experts' weights; kernel, runs, slots: see layers/experts.py.
    """

    @staticmethod
    def forward(ctx, x, weight, slot, inverse, row_expert, kept, w1, b1, w2, b2,
                kernel: str, runs: tuple[int, ...] | None, slots: int, k: int):
        n, a = x.shape[0], slot.shape[0]
        token = slot if k == 1 else slot % n  # (A,) each row's token
        rows = x.index_select(0, token)  # (A, D)
        lay = row_layout(kernel, kept, a, runs, row_expert, slots)
        y, pre, act = ffn_forward(rows, w1, b1, w2, b2, lay)  # (A, D), zero past M
        ctx.save_for_backward(rows, w1, w2, pre, act, y, weight, slot, token, inverse, *lay.tensors())
        ctx.lay, ctx.k = lay.with_tensors([None] * 4), k
        return _rows_to_tokens(y, inverse, k, n, weight)  # (N, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # grad: (N, D)
        rows, w1, w2, pre, act, y, weight, slot, token, inverse, *lay_tensors = ctx.saved_tensors
        g = grad.contiguous().index_select(0, token)  # (A, D)
        g_weight = cast(torch.linalg.vecdot(g, y).index_select(0, inverse), weight.dtype)  # (A,); 0 if dropped
        g.mul_(cast(weight.index_select(0, slot), g.dtype).unsqueeze(1))  # gradient of the expert outputs
        g_rows, gw1, gb1, gw2, gb2 = ffn_backward(g, rows, w1, w2, pre, act, ctx.lay.with_tensors(lay_tensors))
        g_x = _rows_to_tokens(g_rows, inverse, ctx.k, grad.shape[0])  # (N, D)
        return g_x, g_weight, None, None, None, None, gw1, gb1, gw2, gb2, None, None, None, None


class _GatherTokens(torch.autograd.Function):
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


class _Combine(torch.autograd.Function):
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


def _check_moe_args(dim: int, hidden_dim: int, num_experts: int, top_k: int,
                    capacity_factor: float, eval_capacity_factor: float | None,
                    noise_std: float | None, z_loss_weight: float) -> None:
    for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts),
                        ("top_k", top_k)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"MoE {name} must be a positive integer, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"MoE top_k={top_k} exceeds num_experts={num_experts}")
    if not capacity_factor > 0:
        raise ValueError(f"MoE capacity_factor must be > 0, got {capacity_factor}")
    if eval_capacity_factor is not None and not eval_capacity_factor > 0:
        raise ValueError(f"MoE eval_capacity_factor must be > 0, got {eval_capacity_factor}")
    if noise_std is not None and noise_std < 0:
        raise ValueError(f"MoE noise_std must be >= 0, got {noise_std}")
    if z_loss_weight < 0:
        raise ValueError(f"MoE z_loss_weight must be >= 0, got {z_loss_weight}")
