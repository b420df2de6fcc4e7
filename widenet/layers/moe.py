"""Mixture-of-experts layer: router -> dispatcher -> experts -> combine.

WideNet (Xue et al., AAAI 2022, arXiv 2107.11817) routes every token to the
top-k of E experts, g(x) = TopK(softmax(f(x) + eps)), with a per-expert
capacity and the load-balancing loss l = E * sum_i m_i * P_i.

Axis legend used in shape comments:
    B  batch             T  tokens per sequence
    N  routed tokens in this call (non-padding B*T)
    D  model width       H  expert hidden width
    E  experts           K  choices per token (top-k)
    A  assignments = K*N (choice-major: all 1st choices, then all 2nd, ...)
    M  kept assignments (A minus those dropped for capacity)

Dispatch sorts assignments by expert (a stable sort, so priority follows the
choice-major order: every token's first choice beats any second choice, and
earlier tokens beat later ones), cuts each expert's run at its capacity, runs
one matmul pair per expert on its contiguous slice, puts each weighted result
at its assignment's row of a (K, N, D) buffer and sums over K. No tokens x
experts x capacity tensor is ever built, and no scatter-add is needed: every
gather and put has a hand-written adjoint (the autograd Functions below).
When the experts live in this process, gather, experts and combine are one
autograd node (_RoutedExpertFFN); an expert-parallel layer keeps them apart
(_GatherTokens, its own expert step, _Combine) to send rows between ranks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoE", "MoEOutput", "RoutingStats", "Router", "RouterOutput", "Experts", "EXPERT_BACKENDS",
           "grouped_mm_works",
           "expert_capacity", "load_balancing_loss", "router_z_loss"]


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------
@dataclass
class RoutingStats:
    """What one MoE call did with its tokens (all tensors detached).

    expert_fraction: (E,) fraction of the top-k assignments (before dropping)
        that chose each expert; sums to 1.
    dropped_fraction: () fraction of tokens that lost every assignment to
        capacity and got no expert output.
    dropped_assignment_fraction: () fraction of assignments dropped.
    balance_loss, z_loss: () the unweighted loss terms.
    """

    expert_fraction: torch.Tensor
    dropped_fraction: torch.Tensor
    dropped_assignment_fraction: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor


@dataclass
class MoEOutput:
    """output: same shape as the input; aux_loss: () = balance + z_weight * z."""

    output: torch.Tensor
    aux_loss: torch.Tensor
    stats: RoutingStats


@dataclass
class RouterOutput:
    logits: torch.Tensor      # (N, E) float32, noise included when training
    probs: torch.Tensor       # (N, E) float32 softmax of logits
    expert_index: torch.Tensor  # (N, K) int64, best first
    combine_weight: torch.Tensor  # (N, K) float32


# ----------------------------------------------------------------------------
# Pure functions (each tested on its own)
# ----------------------------------------------------------------------------
def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Slots per expert per call: ceil(factor * k * N / E).

    Rounded to 9 decimals before the ceiling so that decimal factors give the
    exact answer (1.1 * 100 / 2 is 55.00000000000001 in floating point).
    """
    return math.ceil(round(factor * top_k * num_tokens / num_experts, 9))


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E * sum_i m_i * P_i (Switch/GShard; WideNet eq. for l_balance).

    probs: (N, E) router probabilities; expert_index: (N, K) chosen experts.
    m_i counts every top-k assignment (before capacity dropping).
    """
    counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts)  # (E,)
    m = counts.to(probs.dtype) / expert_index.numel()
    p = probs.mean(dim=0)  # (E,)
    return num_experts * torch.sum(m * p)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# ----------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------
class Router(nn.Module):
    """Linear D -> E without bias, in float32 (float64 for float64 input), noisy top-k softmax gate."""

    def __init__(self, dim: int, num_experts: int, top_k: int, noise_std: float,
                 renormalize: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim ** -0.5)
        self.top_k = top_k
        self.noise_std = noise_std
        self.renormalize = renormalize

    def forward(self, x: torch.Tensor) -> RouterOutput:  # x: (N, D)
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 if asked
            logits = F.linear(x.to(dtype), self.weight.to(dtype))  # (N, E)
            if self.training and self.noise_std > 0:
                logits = logits + torch.randn_like(logits) * self.noise_std
            probs = logits.softmax(dim=-1)  # (N, E)
            if self.top_k == 1:  # max is ~3x cheaper than topk on CPU
                weight, index = (t.unsqueeze(1) for t in probs.max(dim=-1))  # (N, 1) each
            else:
                weight, index = probs.topk(self.top_k, dim=-1)  # (N, K) each
            if self.renormalize:
                weight = weight / weight.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, probs, index, weight)


EXPERT_BACKENDS = ("auto", "loop", "grouped")


class Experts(nn.Module):
    """E independent FFNs D -> H -> D (GELU), weights stacked per projection.

    w1: (E, D, H)  b1: (E, H)  w2: (E, H, D)  b2: (E, D)

    backend: how the E matmul pairs run.
        "loop": one addmm per expert (any device, any dtype).
        "grouped": one ``torch._grouped_mm`` per projection, forward and
            backward (GPU fast path; also runs on CPU, where it is no faster).
        "auto": "grouped" on CUDA once a one-time probe at these sizes
            matched the loop, else "loop".
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, backend: str = "auto") -> None:
        super().__init__()
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"expert backend must be one of {', '.join(EXPERT_BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier-uniform expert by expert (fan-in and fan-out of one expert's matrix).
        for w in (self.w1, self.w2):
            bound = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))
            nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def forward(self, x: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """x: (M, D) grouped by expert in contiguous runs of the given lengths.

        Under autocast the experts compute in the autocast dtype (as nn.Linear
        would); otherwise in the weights' dtype.
        """
        dtype = self.compute_dtype(x.device)
        weights = self._weights_in(dtype)
        if self._use_grouped(x.device, dtype):
            _check_grouped(dtype, self.w1.shape[1], self.w1.shape[2])
            return _GroupedMatmulExpertFFN.apply(x.to(dtype), *weights, tokens_per_expert)
        return _GroupedExpertFFN.apply(x.to(dtype), *weights, tokens_per_expert)

    def routed(self, x: torch.Tensor, weight: torch.Tensor, slot: torch.Tensor,
               tokens_per_expert: list[int], top_k: int) -> torch.Tensor:
        """Gather, FFN, gate and combine in one step (see _RoutedExpertFFN): (N, D) from x (N, D),
        combine weights (K*N,) and kept assignment ids slot (M,) in runs of tokens_per_expert."""
        dtype = self.compute_dtype(x.device)
        return _RoutedExpertFFN.apply(x.to(dtype), weight, slot, *self._weights_in(dtype), tokens_per_expert, top_k)

    def runs_fused(self, device: torch.device) -> bool:
        """Whether routed() applies here: the per-expert loop (not grouped matmuls)."""
        return not self._use_grouped(device, self.compute_dtype(device))

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        kind = device.type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.w1.dtype

    def _weights_in(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """w1, b1, w2, b2 cast to the compute dtype (a no-op when they already are)."""
        return [w.to(dtype) for w in (self.w1, self.b1, self.w2, self.b2)]

    def _use_grouped(self, device: torch.device, dtype: torch.dtype) -> bool:
        if self.backend != "auto":
            return self.backend == "grouped"
        return device.type == "cuda" and grouped_mm_works(device, dtype, self.w1.shape[1], self.w1.shape[2])


def grouped_mm_works(device: torch.device, dtype: torch.dtype, dim: int, hidden_dim: int) -> bool:
    """Whether torch._grouped_mm runs the expert FFN (forward and backward) on this
    device, dtype and sizes and agrees with the per-expert loop. Probed once per key."""
    key = (str(device), dtype, dim, hidden_dim)
    if key not in _GROUPED_PROBES:
        # The first call may come from evaluation (no_grad / inference mode) or under autocast.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            _GROUPED_PROBES[key] = _probe_grouped_mm(device, dtype, dim, hidden_dim)
    return _GROUPED_PROBES[key]


_GROUPED_PROBES: dict[tuple, bool] = {}
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_grouped(dtype: torch.dtype, dim: int, hidden_dim: int) -> None:
    """What torch._grouped_mm takes: 16-bit or float32 rows whose byte strides are multiples of 16."""
    if dtype not in _GROUPED_DTYPES:
        raise ValueError(f"the grouped expert backend computes in float32, bfloat16 or float16, "
                         f"not {dtype}; use expert_backend='loop'")
    size = torch.empty((), dtype=dtype).element_size()
    if (dim * size) % 16 or (hidden_dim * size) % 16:
        raise ValueError(f"the grouped expert backend needs widths whose rows are multiples of 16 bytes "
                         f"(dim {dim}, hidden {hidden_dim} in {dtype}); use expert_backend='loop'")


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype, dim: int, hidden_dim: int) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        _check_grouped(dtype, dim, hidden_dim)
    except ValueError:
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    counts = [16, 0, 32]  # an empty expert included
    tensors = [torch.randn(*shape, generator=gen).to(device, dtype) * 0.1 for shape in (
        (sum(counts), dim), (3, dim, hidden_dim), (3, hidden_dim), (3, hidden_dim, dim), (3, dim))]
    results = []
    for fn in (_GroupedMatmulExpertFFN, _GroupedExpertFFN):
        inputs = [t.clone().requires_grad_() for t in tensors]
        try:
            out = fn.apply(*inputs, counts)
            out.square().sum().backward()
        except (RuntimeError, NotImplementedError):
            return False
        results.append([out, *(t.grad for t in inputs)])
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    return all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol) for a, b in zip(*results))


class _GroupedExpertFFN(torch.autograd.Function):
    """y[run e] = gelu(x[run e] @ w1[e] + b1[e]) @ w2[e] + b2[e], run by run.

    Hand-written backward so that every per-expert product writes straight
    into one preallocated buffer: no cat/split copies, and each stacked weight
    gets one gradient tensor instead of E partial ones.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, counts: list[int]):  # x: (M, D)
        out, pre, act = _expert_ffn_forward(x, w1, b1, w2, b2, counts)  # (M, D), (M, H), (M, H)
        ctx.save_for_backward(x, w1, w2, pre, act)
        ctx.counts = counts
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # grad_out: (M, D)
        x, w1, w2, pre, act = ctx.saved_tensors
        return (*_expert_ffn_backward(grad_out.contiguous(), x, w1, w2, pre, act, ctx.counts), None)


def _expert_ffn_forward(x, w1, b1, w2, b2, counts):
    """y[run e] = gelu(x[run e] @ w1[e] + b1[e]) @ w2[e] + b2[e]: (M, D), and the hidden
    activations (M, H) before and after GELU. Expert by expert, each product written
    into one buffer; an expert's rows stay in cache from one product to the next."""
    m, h_dim, d_out = x.shape[0], w1.shape[-1], w2.shape[-1]
    pre = x.new_empty(m, h_dim)
    act = x.new_empty(m, h_dim)
    out = x.new_empty(m, d_out)
    for e, rows in _runs(counts):
        torch.addmm(b1[e], x[rows], w1[e], out=pre[rows])
        torch.ops.aten.gelu.out(pre[rows], out=act[rows])
        torch.addmm(b2[e], act[rows], w2[e], out=out[rows])
    return out, pre, act


def _expert_ffn_backward(grad_out, x, w1, w2, pre, act, counts):
    """Gradients (x, w1, b1, w2, b2) of the expert FFN, given what its forward saved. Expert by
    expert, like the forward; an expert without rows gets zero weight and bias gradients."""
    gx = torch.empty_like(x)
    gw1, gw2 = torch.zeros_like(w1), torch.zeros_like(w2)
    gb1 = w1.new_zeros(w1.shape[0], w1.shape[2])
    gb2 = w2.new_zeros(w2.shape[0], w2.shape[2])
    for e, rows in _runs(counts):
        g = grad_out[rows]  # (n_e, D)
        torch.mm(act[rows].t(), g, out=gw2[e])
        gb2[e] = g.sum(0)
        g_pre = torch.ops.aten.gelu_backward(g @ w2[e].t(), pre[rows])  # (n_e, H)
        torch.mm(x[rows].t(), g_pre, out=gw1[e])
        gb1[e] = g_pre.sum(0)
        torch.mm(g_pre, w1[e].t(), out=gx[rows])
    return gx, gw1, gb1, gw2, gb2


class _GroupedMatmulExpertFFN(torch.autograd.Function):
    """The same FFN as _GroupedExpertFFN with one torch._grouped_mm per product.

    offs (E,) int32 are the runs' cumulative ends. Forward: (M, D) x (E, D, H)
    -> (M, H) and back to (M, D). Backward uses the three forms of the op:
    data gradients (M, D) x (E, H, D)^T, weight gradients (D, M) x (M, H) ->
    (E, D, H) with the groups along M (an empty run gives a zero block).
    Biases are added, and their gradients summed, through each row's expert id.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, counts: list[int]):  # x: (M, D)
        counts_t = torch.tensor(counts, device=x.device)
        offs = counts_t.cumsum(0).to(torch.int32)  # (E,)
        row_expert = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts_t)  # (M,)
        pre = torch._grouped_mm(x, w1, offs=offs) + b1.index_select(0, row_expert)  # (M, H)
        act = F.gelu(pre)
        out = torch._grouped_mm(act, w2, offs=offs) + b2.index_select(0, row_expert)  # (M, D)
        ctx.save_for_backward(x, w1, w2, pre, act, offs, row_expert)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # grad_out: (M, D)
        x, w1, w2, pre, act, offs, row_expert = ctx.saved_tensors
        g = grad_out.contiguous()
        gw2 = torch._grouped_mm(act.t(), g, offs=offs)  # (E, H, D)
        gb2 = g.new_zeros(w2.shape[0], w2.shape[2]).index_add_(0, row_expert, g)
        g_pre = torch.ops.aten.gelu_backward(torch._grouped_mm(g, w2.transpose(1, 2), offs=offs), pre)  # (M, H)
        gw1 = torch._grouped_mm(x.t(), g_pre, offs=offs)  # (E, D, H)
        gb1 = g.new_zeros(w1.shape[0], w1.shape[2]).index_add_(0, row_expert, g_pre)
        gx = torch._grouped_mm(g_pre, w1.transpose(1, 2), offs=offs)  # (M, D)
        return gx, gw1, gb1, gw2, gb2, None


def _runs(counts: list[int]):
    """(expert, row slice) for every expert with at least one row."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


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


def _sum_choices(parts: torch.Tensor) -> torch.Tensor:
    """(K, N, D) -> (N, D) in parts' dtype. Plain adds, not .sum(0): CUDA autocast
    runs sum in float32, which turned bf16 expert outputs into a float32 MoE output."""
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


def _rows_at(src: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(num_rows, D) zeros with src's rows put at index (index has no repeats)."""
    if index.numel() == num_rows:  # a permutation: read rows through its inverse (a gather is ~5x faster on CPU)
        inverse = torch.empty_like(index)
        inverse[index] = torch.arange(num_rows, device=index.device)
        return src.index_select(0, inverse)
    return src.new_zeros(num_rows, *src.shape[1:]).index_copy_(0, index, src)


def _sum_at_tokens(src: torch.Tensor, slot: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Rows src (M, D) of assignments slot (M,) summed per token: (N, D), zeros where none."""
    return _sum_choices(_rows_at(src, slot, k * n).view(k, n, -1))


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


class _RoutedExpertFFN(torch.autograd.Function):
    """_GatherTokens -> _GroupedExpertFFN -> _Combine in one autograd node, for
    experts that run in this process:

        out[n] = sum over kept assignments a of token n: weight[a] * FFN_e(a)(x[n])

    x: (N, D); weight: (A,) combine weights by assignment id; slot: (M,) kept
    assignment ids grouped by expert in runs of counts (E,). One node instead
    of three saves their autograd bookkeeping and a copy of the gathered rows'
    gradient, which count at small token counts on a CPU.
    """

    @staticmethod
    def forward(ctx, x, weight, slot, w1, b1, w2, b2, counts: list[int], k: int):
        n = x.shape[0]
        token = slot if k == 1 else slot % n  # (M,) each assignment's token
        rows = x.index_select(0, token)  # (M, D)
        y, pre, act = _expert_ffn_forward(rows, w1, b1, w2, b2, counts)  # (M, D), (M, H), (M, H)
        gate = weight.index_select(0, slot).to(y.dtype).unsqueeze(1)  # (M, 1)
        ctx.save_for_backward(rows, w1, w2, pre, act, y, gate, slot, token)
        ctx.counts, ctx.k, ctx.weight_shape, ctx.weight_dtype = counts, k, weight.shape, weight.dtype
        return _sum_at_tokens(y * gate, slot, k, n)  # (N, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # grad: (N, D)
        rows, w1, w2, pre, act, y, gate, slot, token = ctx.saved_tensors
        g = grad.index_select(0, token)  # (M, D)
        g_weight = g.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)  # (A,)
        g_weight.index_copy_(0, slot, torch.linalg.vecdot(g, y).to(ctx.weight_dtype))
        g_rows, gw1, gb1, gw2, gb2 = _expert_ffn_backward(g * gate, rows, w1, w2, pre, act, ctx.counts)
        g_x = _sum_at_tokens(g_rows, slot, ctx.k, grad.shape[0])  # (N, D)
        return g_x, g_weight, None, gw1, gb1, gw2, gb2, None, None


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
        expert_backend: "auto", "loop" or "grouped" (see Experts).

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

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for a call with num_tokens routed tokens."""
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
        if padding_mask is not None and padding_mask.dtype != torch.bool:
            padding_mask = padding_mask != 0  # 0/1 masks mean the same as False/True
        flat = x.reshape(-1, self.dim)  # (B*T, D)
        keep = None if padding_mask is None else (~padding_mask.reshape(-1)).nonzero().squeeze(1)
        tokens = flat if keep is None else flat.index_select(0, keep)  # (N, D)
        routed, aux, stats = self._route_and_compute(tokens)  # (N, D)
        if keep is not None:
            routed = flat.new_zeros(flat.shape).index_copy(0, keep, routed)
        return MoEOutput(routed.reshape(x.shape), aux, stats)

    # -- internals -----------------------------------------------------------
    def _route_and_compute(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RoutingStats]:
        n, e = x.shape[0], self.num_experts
        if n == 0:
            zero = x.new_zeros((), dtype=torch.float32)
            stats = RoutingStats(x.new_zeros(e, dtype=torch.float32), zero, zero, zero, zero)
            return x.new_zeros(0, self.dim), zero + 0.0 * self.router.weight.sum(), stats

        route = self.router(x)
        balance = load_balancing_loss(route.probs, route.expert_index, e)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.z_loss_weight > 0):
            z = router_z_loss(route.logits)  # reported even when it does not train
        aux = balance + self.z_loss_weight * z if self.z_loss_weight > 0 else balance

        out, counts, slot = self._dispatch_and_combine(x, route)
        return out, aux, self._stats(counts, slot, n, balance, z)

    @torch.compiler.disable  # data-dependent shapes; runs eagerly inside compiled models
    def _dispatch_and_combine(self, x: torch.Tensor, route: RouterOutput
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Experts' weighted outputs summed per token: (N, D); also counts (E,) and kept assignment ids (M,)."""
        n, k = x.shape[0], self.top_k
        # Assignments in choice-major priority order: a = choice * N + token.
        expert_of = route.expert_index.t().reshape(-1)  # (A,)
        order = torch.sort(expert_of, stable=True).indices  # (A,) grouped by expert
        counts = torch.bincount(expert_of, minlength=self.num_experts)  # (E,)
        slot, per_expert = _cut_at_capacity(order, counts.tolist(), self.capacity(n))  # (M,), (E,)

        weight = route.combine_weight.t().reshape(-1)  # (A,) choice-major like slot
        if self.local_experts and self.experts.runs_fused(x.device):
            out = self.experts.routed(x, weight, slot, per_expert, k)  # (N, D)
        else:
            y = self._run_experts(_GatherTokens.apply(x, slot, k), per_expert)  # (M, D)
            out = _Combine.apply(y, weight, slot, k, n)  # (N, D)
        return out, counts, slot

    # Whether self.experts computes every expert here; then gather, experts and
    # combine run as one fused step. An expert-parallel subclass sets False.
    local_experts = True

    def _run_experts(self, rows: torch.Tensor, per_expert: list[int]) -> torch.Tensor:
        """rows: (M, D) grouped by expert in runs of per_expert (E,) -> outputs (M, D), same order.

        The one step an expert-parallel subclass replaces (send the runs to
        the ranks owning their experts and bring the results back).
        """
        return self.experts(rows, per_expert)

    def _stats(self, counts: torch.Tensor, slot: torch.Tensor, n: int,
               balance: torch.Tensor, z: torch.Tensor) -> RoutingStats:
        """slot: (M,) kept assignment ids (choice * N + token)."""
        with torch.no_grad():
            assignments = counts.sum().clamp(min=1)
            if self.top_k == 1:  # one assignment per token: kept ids are distinct tokens
                served = torch.tensor(slot.numel() / n, dtype=torch.float32, device=counts.device)
            else:
                served = torch.zeros(n, dtype=torch.bool, device=counts.device)
                served[slot % n] = True
                served = served.float().mean()
            return RoutingStats(
                expert_fraction=counts.float() / assignments,
                dropped_fraction=1.0 - served,
                dropped_assignment_fraction=1.0 - slot.numel() / assignments.float(),
                balance_loss=balance.detach(),
                z_loss=z.detach(),
            )


def _cut_at_capacity(order: torch.Tensor, counts: list[int], capacity: int) -> tuple[torch.Tensor, list[int]]:
    """Keep the first `capacity` of each expert's run in order (A,): kept ids (M,) and run lengths (E,)."""
    kept = [min(c, capacity) for c in counts]
    if kept == counts:
        return order, kept
    starts = itertools.accumulate(counts, initial=0)
    return torch.cat([order[s:s + c] for s, c in zip(starts, kept)]), kept


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
