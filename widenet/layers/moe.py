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
   autograd node with a hand-written backward (layers/router.py).
1. plan_dispatch (layers/dispatch.py) sorts the assignments by expert (a stable sort, so priority
   follows the choice-major order: every token's first choice beats any
   second choice, earlier tokens beat later ones), keeps the first
   `capacity` of each expert, and orders the A rows of the expert buffer:
   kept assignments grouped by expert, then the dropped ones and padding.
2. RoutedExperts gathers each row's token, runs the experts on their runs of
   rows (layers/experts.py: per-expert loop, grouped matmuls or padded
   batched matmuls), scales by the combine weight, and reads the rows back
   in assignment order through the inverse permutation, summing over K: a
   gather in every direction, no scatter-add and no tokens x experts x
   capacity tensor, in one autograd node with a hand-written backward.

Padding tokens (padding_mask) become assignments of a pseudo-expert E: they
sort last, take no capacity, get zero output and take no part in the losses.
An expert-parallel layer (local_experts = False) keeps gather, experts and
combine apart (GatherTokens, its own expert step, Combine) to send rows
between ranks; it reads the run lengths on the host for the split sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from ..settings import SettingError, check_types
from .dispatch import Combine, DispatchPlan, GatherTokens, RoutedExperts, plan_dispatch
from .experts import EXPERT_BACKENDS, Experts, cast, grouped_mm_works
from .masks import resolve_padding_mask
from .router import Router, RouterOutput, at_least_one, load_balancing_loss, router_z_loss

__all__ = ["MoE", "MoEConfig", "dropless_routing", "MOE_SETTINGS", "MoEOutput", "RoutingStats", "Router", "RouterOutput", "Experts", "EXPERT_BACKENDS",
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
        return ((self._num_valid - served) / at_least_one(self._num_valid)).float()

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


def _setting(help_text: str, **kw: Any):
    return field(metadata={"help": help_text}, **kw)


@dataclass(frozen=True)
class MoEConfig:
    """The settings of an MoE layer (its sizes come from the model: width D, hidden width H).

    Validated here, once; the encoder's config carries one, the CLI's MoE flags
    are generated from these fields (widenet.cli_args.add_moe_arguments).
    """

    num_experts: int = _setting("E: experts", default=4)
    top_k: int = _setting("K: experts per token", default=2)
    capacity_factor: float = _setting("slots per expert = ceil(C * K * N / E) in training", default=1.2)
    eval_capacity_factor: float | None = _setting("C in eval mode (default: as in training)", default=None)
    noise_std: float | None = _setting("std of the router logits' noise in training (default 1/E; 0: none)",
                                       default=None)
    dropless: bool = _setting("never drop an assignment (capacity ignored)", default=False)
    renormalize: bool = _setting("divide the K combine weights by their sum", default=False)
    z_loss_weight: float = _setting("weight of the router z-loss inside the aux loss", default=0.0)
    expert_backend: str = _setting("expert kernel: auto, loop, grouped or padded (layers/experts.py)",
                                   default="auto")

    def __post_init__(self) -> None:
        check_types(self, "MoE ")  # types, finite numbers
        for name in ("num_experts", "top_k"):
            if getattr(self, name) < 1:
                raise SettingError(f"MoE {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.top_k > self.num_experts:
            raise SettingError(f"MoE top_k={self.top_k} exceeds num_experts={self.num_experts}")
        for name, least in (("capacity_factor", 0), ("eval_capacity_factor", 0), ("noise_std", None),
                            ("z_loss_weight", None)):
            value = getattr(self, name)
            if value is not None and (value <= 0 if least == 0 else value < 0):
                rule = "a number > 0" if least == 0 else "a number >= 0"
                raise SettingError(f"MoE {name} must be {rule}, got {value!r}")
        if self.expert_backend not in EXPERT_BACKENDS:
            raise ValueError(f"MoE expert_backend must be one of {', '.join(EXPERT_BACKENDS)}, "
                             f"got {self.expert_backend!r}")
        self.capacity_ratios  # computed now, not first inside a compiled graph

    @functools.cached_property  # (computed again for a config pickled before they were kept)
    def capacity_ratios(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The capacity factors in training and in eval mode as integer ratios (capacity_ratio), kept:
        capacity() then reads no float, which torch.compile would make symbolic when layers differ in
        it (and then fail on it)."""
        train = capacity_ratio(self.capacity_factor, self.num_experts, self.top_k)
        evaluate = train if self.eval_capacity_factor is None else \
            capacity_ratio(self.eval_capacity_factor, self.num_experts, self.top_k)
        return train, evaluate

    @property
    def router_noise(self) -> float:
        """The noise std in use: noise_std, or 1/E when it is None (the authors' code)."""
        return 1.0 / self.num_experts if self.noise_std is None else self.noise_std


MOE_SETTINGS = tuple(f.name for f in fields(MoEConfig))


def capacity_ratio(factor: float, num_experts: int, top_k: int) -> tuple[int, int]:
    """A capacity factor as integers (p, q): the nearest fraction with q <= 10**6, so the decimal that
    was written (1.1 is 11/10, not the float just above it), at most E / K (from there on every
    expert has a slot per token), which keeps p * K * N within int64."""
    ratio = min(Fraction(factor).limit_denominator(10 ** 6), Fraction(num_experts, top_k))
    return ratio.numerator, ratio.denominator


def expert_capacity(num_tokens: int | torch.Tensor, num_experts: int, top_k: int,
                    factor: float | tuple[int, int]) -> int | torch.Tensor:
    """Slots per expert per call: ceil(factor * k * N / E), at least 1 and at most N (an expert gets
    at most one assignment per token, so more slots would only be empty); an int, or a () int64
    tensor for a token count held on the device (padding masks).

    Integer arithmetic on the factor's ratio (capacity_ratio, or given as (p, q)): exact for decimal
    factors (1.1 * 100 / 2 is 55.00000000000001 in floating point; capacity is 55), and a symbolic N
    under torch.compile stays an integer expression. The floor of 1 keeps a tiny factor (1e-30)
    from leaving no slot at all.
    """
    p, q = factor if isinstance(factor, tuple) else capacity_ratio(factor, num_experts, top_k)
    num, den = p * top_k, q * num_experts
    if isinstance(num_tokens, torch.Tensor):
        slots = ((num_tokens.long() * num + (den - 1)) // den).clamp(min=1)
        return torch.minimum(slots, num_tokens.long())
    return min(max((num_tokens * num + den - 1) // den, 1), num_tokens)


# ----------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------
class MoE(nn.Module):
    """Mixture-of-experts FFN with noisy top-k routing (WideNet, Sec. 3.1).

    MoE(dim, hidden_dim, num_experts=4, top_k=2, **settings) or
    MoE(dim, hidden_dim, config=MoEConfig(...)) (not both): token width D, expert hidden
    width H, and the MoEConfig settings (capacity, noise, dropless,
    renormalize, z-loss, expert backend).

    forward(x, padding_mask=None) takes x of shape (B, T, D) or (N, D) and a
    boolean padding_mask of shape x.shape[:-1], True where a token is padding.
    Padding takes no part in routing, capacity or the losses, and gets zero
    output. Returns MoEOutput(output, aux_loss, stats).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int | None = None, top_k: int | None = None, *,
                 config: MoEConfig | dict[str, Any] | None = None, activation: str = "gelu",
                 **settings: Any) -> None:
        super().__init__()
        settings.update((k, v) for k, v in (("num_experts", num_experts), ("top_k", top_k)) if v is not None)
        if config is None:
            config = MoEConfig(**settings)  # num_experts 4, top_k 2 unless given
        elif settings:
            raise TypeError(f"give MoE settings in config or as keywords, not both ({', '.join(settings)})")
        elif isinstance(config, dict):
            config = MoEConfig(**config)
        elif not isinstance(config, MoEConfig):
            raise TypeError(f"MoE config must be a MoEConfig or a dict of its settings, got {type(config).__name__}")
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoE {name} must be a positive integer, got {value!r}")
        self.cfg = config
        self.dim, self.num_experts, self.top_k = dim, config.num_experts, config.top_k
        self.router = Router(dim, config.num_experts, config.top_k, config.router_noise, config.renormalize)
        self.experts = Experts(config.num_experts, dim, hidden_dim, config.expert_backend, activation)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"dim={self.dim}, experts={c.num_experts}, top_k={c.top_k}, "
                f"capacity_factor={c.capacity_factor}, dropless={c.dropless}")

    def capacity(self, num_tokens: int | torch.Tensor) -> int | torch.Tensor:
        """Slots per expert for a call with num_tokens routed (non-padding) tokens; dropless: every
        token (a token's K choices are distinct experts, so no expert gets more than one per token)."""
        c = self.cfg
        if c.dropless:
            return num_tokens
        train, evaluate = c.capacity_ratios
        return expert_capacity(num_tokens, c.num_experts, c.top_k, train if self.training else evaluate)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, *,
                keep_mask: torch.Tensor | None = None) -> MoEOutput:
        """x (B, T, D) or (N, D); padding_mask bool, True = padding, or keep_mask (bool or 0/1
        numbers, 1 = a real token: Hugging Face's attention_mask), of shape x.shape[:-1]."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"MoE expects a floating-point torch.Tensor of tokens, got {got}")
        weights = self.experts.w1.dtype
        if x.dtype != weights and not torch.is_autocast_enabled(x.device.type):  # as nn.Linear refuses it
            raise TypeError(f"MoE input is {x.dtype} and its weights {weights}: convert one to the other "
                            f"(x.to({weights}) or moe.to({x.dtype})), or run under torch.autocast")
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE expects token dimension {self.dim}, got input of shape {tuple(x.shape)}")
        padding_mask = resolve_padding_mask(x.shape[:-1], padding_mask, keep_mask)
        flat = x.reshape(-1, self.dim)  # (N, D)
        valid = None if padding_mask is None else ~padding_mask.reshape(-1)  # (N,)
        if valid is not None:  # whatever padding holds (NaN from an empty buffer) stays out: NaN * 0 is NaN
            flat = torch.where(valid.unsqueeze(1), flat, 0.0)
        out, aux, stats = self._route_and_compute(flat, valid)
        return MoEOutput(out.reshape(x.shape), aux, stats)

    # -- internals -----------------------------------------------------------
    def _route_and_compute(self, x: torch.Tensor, valid: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor, RoutingStats]:
        """x (N, D), valid (N,) or None -> output (N, D), aux loss, statistics."""
        n, e = x.shape[0], self.num_experts
        if n == 0:
            stats = RoutingStats.empty(e, x.device)
            return x[:0] * 0, 0.0 * self.router.weight.sum(), stats  # (0, D), in the graph as x is

        dropless, z_weight = self.cfg.dropless, self.cfg.z_loss_weight
        with_z = z_weight > 0
        route = self.router(x, valid, with_z)
        experts = self.experts
        dtype = experts.compute_dtype(x.device)
        kernel = experts.kernel(x.device, dtype, dropless) if self.local_experts else "loop"
        host = kernel == "loop"  # the loop kernel reads the run lengths on the host
        num_valid = n if valid is None else (int(valid.sum()) if host else valid.sum())
        plan = plan_dispatch(route.expert_index, route.counts, self.capacity(num_valid), valid, dropless, host)
        balance = route.balance_loss
        aux = balance + z_weight * route.z_loss if with_z else balance
        stats = RoutingStats(plan.counts, plan.kept, balance, route.z_loss, route.logits, valid, plan.inverse,
                             self.top_k, num_valid)  # the z-loss computed from the logits if read

        weight = route.combine_weight.reshape(-1)  # (A,) choice-major, like the assignment ids
        if self.local_experts:  # gather, experts and combine in one autograd node
            slots = self.capacity(n) if kernel == "padded" else 0  # static: every token counted
            out = RoutedExperts.apply(cast(x, dtype), weight, plan.slot, plan.inverse, plan.row_expert, plan.kept,
                                       *experts.weights_in(dtype), kernel, plan.runs, slots, self.top_k,
                                       experts.approximate)
        else:
            kept_ids = plan.slot[:sum(plan.runs)]  # (M,)
            y = self._run_experts(GatherTokens.apply(x, kept_ids, self.top_k), plan.runs)  # (M, D)
            out = Combine.apply(y, weight, kept_ids, self.top_k, n)  # (N, D)
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


@contextlib.contextmanager
def dropless_routing(model: nn.Module) -> Iterator[None]:
    """Every MoE layer of `model` dropless for the block (each token gets its top-k experts, whatever
    the capacity), and as it was after it: what inference that must not depend on an input's batch
    neighbours (predict) and FLOP counting (the top-k compute) need."""
    layers = [m for m in model.modules() if isinstance(m, MoE) and not m.cfg.dropless]
    saved = [m.cfg for m in layers]
    for m in layers:
        m.cfg = dataclasses.replace(m.cfg, dropless=True)
    try:
        yield
    finally:
        for m, cfg in zip(layers, saved):
            m.cfg = cfg
