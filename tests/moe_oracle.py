"""Independent reference for the MoE layer: GShard-style one-hot einsum dispatch.

Written from the specification only (it does not import or copy widenet's
dispatch code). Everything is dense: a (N, E, C) one-hot dispatch tensor,
an einsum into per-expert buffers, the expert FFNs by einsum, and an einsum
back. Slow and memory hungry by design, and easy to read.

Specification followed:
    logits = x @ Wr^T, in float32 (float64 for float64 x)   (N, E)
    probs  = softmax(logits)                                 (N, E)
    weight, index = top_k(probs)   (best first)              (N, K)
    weight /= weight.sum(-1) when renormalize
    capacity = min(ceil(factor * k * N / E), N) slots per expert
    Priority: every token's 1st choice in token order, then every 2nd
    choice in token order, ... An assignment's position in its expert is the
    number of earlier assignments (in that order) to the same expert; it is
    dropped when position >= capacity.
    dispatch[n, e, c] = 1 when token n's kept assignment sits in slot c of e
    combine = dispatch * weight
    expert_in  = einsum('nec,nd->ecd', dispatch, x)
    expert_out = gelu(expert_in @ w1[e] + b1[e]) @ w2[e] + b2[e]
    out = einsum('nec,ecd->nd', combine, expert_out)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["dispatch_tensor", "einsum_moe", "kept_assignments", "oracle_balance_loss", "oracle_capacity",
           "oracle_z_loss"]


def oracle_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """ceil(factor * k * N / E), at most N: the spec's capacity per expert (an expert can receive
    at most one assignment per token, so slots beyond N could only stay empty)."""
    return min(math.ceil(factor * top_k * num_tokens / num_experts), num_tokens)


def dispatch_tensor(expert_index: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(N, K) chosen experts -> (N, E, C) one-hot dispatch tensor (float32).

    Choice-major priority: for choice j, the fill of each expert after all
    earlier choices is the starting offset, and within choice j the position
    is the running count over tokens (GShard's cumsum trick). A token picks an
    expert at most once, so dispatch[n, e] has at most one 1.
    """
    n, k = expert_index.shape
    out = torch.zeros(n, num_experts, capacity, dtype=torch.float32, device=expert_index.device)
    fill = torch.zeros(num_experts, dtype=torch.long, device=expert_index.device)  # (E,)
    for j in range(k):
        onehot = F.one_hot(expert_index[:, j], num_experts).long()  # (N, E)
        position = fill.unsqueeze(0) + torch.cumsum(onehot, dim=0) - 1  # (N, E)
        position = (position * onehot).sum(dim=1)  # (N,) slot of this assignment
        rows = torch.nonzero(position < capacity).squeeze(1)
        out[rows, expert_index[rows, j], position[rows]] = 1.0
        fill = fill + onehot.sum(dim=0)
    return out


def kept_assignments(dispatch: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """(N, K) bool: whether each top-k assignment got a slot."""
    per_expert = dispatch.sum(dim=2)  # (N, E) 0/1
    return per_expert.gather(1, expert_index) > 0


def einsum_moe(x, router_weight, w1, b1, w2, b2, top_k, capacity, renormalize=False):
    """Deterministic (noise-free) MoE forward by one-hot einsums.

    x: (N, D); router_weight: (E, D); w1: (E, D, H); b1: (E, H); w2: (E, H, D);
    b2: (E, D); capacity: slots per expert (int >= 1).
    Returns (out (N, D) in x's dtype, probs (N, E) float32/64, expert_index (N, K)).
    Differentiable w.r.t. every tensor argument.
    """
    num_experts = router_weight.shape[0]
    dtype = torch.promote_types(x.dtype, torch.float32)
    logits = x.to(dtype) @ router_weight.to(dtype).t()  # (N, E) float32 or float64
    probs = torch.softmax(logits, dim=-1)  # (N, E)
    weight, index = torch.topk(probs, top_k, dim=-1)  # (N, K)
    if renormalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    dispatch = dispatch_tensor(index, num_experts, capacity).to(x.dtype)  # (N, E, C)
    gate = torch.zeros(x.shape[0], num_experts, dtype=x.dtype, device=x.device)
    gate = gate.scatter(1, index, weight.to(x.dtype))  # (N, E) combine weight of each chosen expert
    combine = dispatch * gate.unsqueeze(-1)  # (N, E, C)
    expert_in = torch.einsum("nec,nd->ecd", dispatch, x)  # (E, C, D)
    hidden = F.gelu(torch.einsum("ecd,edh->ech", expert_in, w1) + b1.unsqueeze(1))  # (E, C, H)
    expert_out = torch.einsum("ech,ehd->ecd", hidden, w2) + b2.unsqueeze(1)  # (E, C, D)
    out = torch.einsum("nec,ecd->nd", combine, expert_out)  # (N, D)
    return out, probs, index


def oracle_balance_loss(probs, expert_index, num_experts):
    """E * sum_i m_i * P_i with plain Python loops (returns a float)."""
    probs = probs.detach().tolist() if isinstance(probs, torch.Tensor) else probs
    n = len(probs)
    assignments = [int(e) for row in expert_index.tolist() for e in row]
    total = 0.0
    for i in range(num_experts):
        m_i = sum(1 for e in assignments if e == i) / len(assignments)
        p_i = sum(probs[t][i] for t in range(n)) / n
        total += m_i * p_i
    return num_experts * total


def oracle_z_loss(logits):
    """mean over tokens of logsumexp(logits)^2, with Python loops (returns a float)."""
    rows = logits.tolist()
    values = []
    for row in rows:
        top = max(row)
        lse = top + math.log(sum(math.exp(v - top) for v in row))
        values.append(lse * lse)
    return sum(values) / len(values)
