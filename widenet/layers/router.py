"""The router of an MoE layer: noisy top-k softmax gate, load-balancing loss and z-loss.

WideNet (Xue et al., AAAI 2022): g(x) = TopK(softmax(f(x) + eps)), f linear
without bias, eps ~ N(0, 1/E) while training; l_balance = E * sum_i m_i * P_i.
Axes as in layers/moe.py (N tokens, D width, E experts, K choices).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .experts import cast

__all__ = ["Router", "RouterOutput", "at_least_one", "load_balancing_loss", "masked_mean", "router_z_loss"]


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


# ----------------------------------------------------------------------------
# Pure functions (each tested on its own)
# ----------------------------------------------------------------------------
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
        p = (probs * valid).sum(dim=1) / at_least_one(num_valid)
    m = counts.to(probs.dtype) / at_least_one(top_k * num_valid)
    return probs.shape[0] * torch.dot(m, p)


def router_z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (valid) tokens of logsumexp(logits)^2, the
    logsumexp taken over the experts' dim of logits."""
    return masked_mean(torch.logsumexp(logits, dim=dim).pow(2), valid, None if valid is None else valid.sum())


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None, num_valid: int | torch.Tensor | None
                 ) -> torch.Tensor:
    """Mean of values (N,) over the valid entries."""
    return values.mean() if valid is None else (values * valid).sum() / at_least_one(num_valid)


def at_least_one(n: int | torch.Tensor) -> int | torch.Tensor:
    return n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1)


# ----------------------------------------------------------------------------
# The module and its autograd node
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

    def train(self, mode: bool = True) -> Router:
        if mode and self.top_k == 1 and self.renormalize:  # (warnings shows it once per process)
            warnings.warn("the MoE routes top-1 with renormalize: every combine weight is then 1, so the task loss "
                          "never reaches the router, which learns from the balance loss alone; turn renormalize "
                          "off (--no-renormalize) or route top-2", stacklevel=2)
        return super().train(mode)

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
        z = masked_mean(lse.square(), valid, num_valid) if with_z else balance.new_zeros(())
        combine = gate / gate.sum(dim=0, keepdim=True) if renormalize else gate
        ctx.save_for_backward(x, weight, probs, index, gate, combine, counts, lse, valid)
        ctx.num_valid, ctx.top_k, ctx.renormalize = num_valid, top_k, renormalize
        ctx.mark_non_differentiable(index, counts, logits, probs)
        return combine, index, balance, z, counts, logits, probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_combine, _g_index, g_balance, g_z, _g_counts, _g_logits, _g_probs):
        x, weight, probs, index, gate, combine, counts, lse, valid = ctx.saved_tensors
        e, nv = probs.shape[0], at_least_one(ctx.num_valid)
        g_probs = torch.zeros_like(probs)  # (E, N)
        if g_combine is not None:
            if ctx.renormalize:  # combine = gate / sum(gate)
                g_combine = (g_combine - (g_combine * combine).sum(0, keepdim=True)) / gate.sum(0, keepdim=True)
            g_probs.scatter_(0, index, g_combine)  # the K chosen experts of a token are distinct
        if g_balance is not None:
            m = counts.to(probs.dtype) / at_least_one(ctx.top_k * ctx.num_valid)  # (E,)
            d_probs = (g_balance * e / nv * m).unsqueeze(1)  # (E, 1): d balance / d probs[i, n] = E m_i / N_valid
            g_probs += d_probs if valid is None else d_probs * valid
        g_logits = probs * (g_probs - (probs * g_probs).sum(0, keepdim=True))  # softmax backward
        if lse is not None and g_z is not None:
            dz = g_z * 2.0 / nv * lse  # (N,): d z / d lse_n
            g_logits += probs * (dz if valid is None else dz * valid)
        return g_logits.t() @ weight, g_logits @ x, None, None, None, None, None, None
