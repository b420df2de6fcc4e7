"""The experts of an MoE layer, and the kernels that run them on rows grouped by expert.

WideNet (Xue et al., AAAI 2022, arXiv 2107.11817) shares one MoE layer, router
and experts, across all blocks; each of its E experts is a ViT MLP
D -> H -> D with GELU. The weights are stacked per projection (torchtitan's
layout): w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D).

Shape legend:
    R  rows of a buffer grouped by expert: expert 0's rows, then expert 1's, ...
       The first M = sum(kept) rows belong to experts; rows M..R-1 are spare
       (assignments dropped for capacity, or padding) and come out as zeros.
    D  model width    H  expert hidden width    E  experts
    C  slots per expert (the "padded" kernel's buffers)

Kernels (``Experts.kernel`` picks one; all compute the same function):
    loop     one addmm per expert on its run of rows. Needs the run lengths on
             the host: free on a CPU, a device synchronisation on a GPU. Any
             dtype, any width.
    grouped  one ``torch._grouped_mm`` per product, the runs' ends (offs) a
             device tensor: static shapes, no synchronisation where torch has a
             grouped kernel (CUDA bfloat16 on sm90/sm100; its other CUDA cases
             loop over the groups on the host). float32/bfloat16/float16 rows
             whose byte strides are multiples of 16.
    padded   GShard's fixed (E, C) buffers and batched matmuls: static shapes
             and no synchronisation on any device, dtype and width, but it
             computes every slot, used or not (E*C rows instead of M).
Backward passes are written by hand: each stacked weight gets one gradient
tensor, and nothing is accumulated with atomics, so results are reproducible
bit for bit. Rows past M never reach an output or a gradient.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .expert_loop import loop_backward, loop_forward

__all__ = ["ACTIVATIONS", "EXPERT_BACKENDS", "Experts", "gelu_approximation", "RowLayout", "cast", "ffn_backward", "ffn_forward", "grouped_mm_works",
           "row_layout"]

EXPERT_BACKENDS = ("auto", "loop", "grouped", "padded")
_log = logging.getLogger("widenet.moe")


ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # name -> F.gelu's `approximate`


def gelu_approximation(activation: str) -> str:
    """F.gelu's `approximate` for an activation name: "gelu" (exact, erf) or "gelu_tanh"
    (the tanh approximation: BERT/ALBERT's "gelu_new")."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; t itself when it already is (a no-op .to() still costs ~5 us of Python)."""
    return t if t.dtype == dtype else t.to(dtype)


class Experts(nn.Module):
    """E independent FFNs D -> H -> D (GELU), weights stacked per projection.

    backend: "loop", "grouped", "padded" (see the module doc) or "auto":
        on a CPU outside torch.compile, "loop" (reading the run lengths costs
            nothing there, and one matmul per expert computes no empty slots);
        on a GPU or inside torch.compile (static shapes, no host sync):
            "grouped" where it is sync-free and passed a one-time check
            against the loop, else "padded" with C = the capacity; a dropless
            layer outside torch.compile takes "loop" instead (its padded
            buffers, N slots per expert, would hold E/K times the work).
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, backend: str = "auto",
                 activation: str = "gelu") -> None:
        super().__init__()
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"expert backend must be one of {', '.join(EXPERT_BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.activation = activation
        self.approximate = gelu_approximation(activation)
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

    def extra_repr(self) -> str:
        e, d, h = self.w1.shape
        return f"experts={e}, dim={d}, hidden={h}, backend={self.backend!r}"

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The autocast dtype under autocast (as nn.Linear would), else the weights' dtype."""
        kind = device.type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.w1.dtype

    def weights_in(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """w1, b1, w2, b2 cast to the compute dtype."""
        return [cast(w, dtype) for w in (self.w1, self.b1, self.w2, self.b2)]

    def kernel(self, device: torch.device, dtype: torch.dtype, dropless: bool = False) -> str:
        """The kernel of a call on this device and dtype: the backend, or auto's pick."""
        dim, hidden = self.w1.shape[1], self.w1.shape[2]
        if self.backend == "grouped":
            _check_grouped(dtype, dim, hidden)
        if self.backend != "auto":
            return self.backend
        compiling = torch.compiler.is_compiling()
        if device.type == "cpu" and not compiling:
            return "loop"
        if _grouped_mm_is_sync_free(device, dtype) and grouped_mm_works(device, dtype, dim, hidden):
            return "grouped"
        return "loop" if dropless and not compiling else "padded"

    def forward(self, rows: torch.Tensor, runs: Sequence[int]) -> torch.Tensor:
        """rows (M, D) grouped by expert in runs of the given lengths -> outputs (M, D).

        The expert step of an expert-parallel layer (its rows arrive with
        their run lengths on the host): the loop kernel, or grouped matmuls
        where auto picks them.
        """
        dtype = self.compute_dtype(rows.device)
        kernel = "grouped" if self.kernel(rows.device, dtype) == "grouped" else "loop"  # runs are on the host
        kept = torch.tensor(list(runs), device=rows.device)
        return _ExpertFFN.apply(cast(rows, dtype), kept, *self.weights_in(dtype), kernel, tuple(runs),
                                self.approximate)


# ----------------------------------------------------------------------------
# Row layouts and the three kernels
# ----------------------------------------------------------------------------
@dataclass
class RowLayout:
    """Where each expert's rows lie in a buffer of R rows, in the form one kernel needs.

    loop:    runs (E,) host ints, rows past their sum are spare.
    grouped: offs (E,) int32 run ends; row_expert (R,) each row's expert (E: spare).
    padded:  slot_of_row (R,) each row's slot in the (E*C) buffers (E*C: spare);
             row_of_slot (E*C,) the row in each slot (R: empty); slots C.
    """

    kernel: str
    rows: int
    runs: tuple[int, ...] | None = None
    offs: torch.Tensor | None = None
    row_expert: torch.Tensor | None = None
    slot_of_row: torch.Tensor | None = None
    row_of_slot: torch.Tensor | None = None
    slots: int = 0
    approximate: str = "none"  # GELU: "none" (exact, erf) or "tanh"

    @property
    def num_experts(self) -> int:
        return self.offs.shape[0]

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.offs, self.row_expert, self.slot_of_row, self.row_of_slot]

    def restored(self, saved: Sequence[torch.Tensor | None]) -> tuple[RowLayout, list[torch.Tensor]]:
        """From saved tensors laid out as [*tensors(), *what ffn_forward saved]: this layout with its
        tensors back, and the kernel's tensors."""
        n = len(self.tensors())
        return self.with_tensors(saved[:n]), list(saved[n:])

    def without_tensors(self) -> RowLayout:
        """This layout with its tensors left out (they go to save_for_backward; restored brings them back)."""
        return self.with_tensors([None] * len(self.tensors()))

    def with_tensors(self, tensors: Sequence[torch.Tensor | None]) -> RowLayout:
        offs, row_expert, slot_of_row, row_of_slot = tensors
        return RowLayout(self.kernel, self.rows, self.runs, offs, row_expert, slot_of_row, row_of_slot, self.slots,
                         self.approximate)


def row_layout(kernel: str, kept: torch.Tensor, rows: int, runs: Sequence[int] | None = None,
               row_expert: torch.Tensor | None = None, slots: int = 0, approximate: str = "none") -> RowLayout:
    """The layout of `rows` buffer rows holding kept (E,) rows per expert, in expert order.

    runs: kept on the host (the loop kernel). row_expert (R,): each row's expert,
    E for spare rows, when the caller has it (else derived). slots: C, the
    padded kernel's slots per expert (>= every kept count). approximate: the GELU's
    ("none" or "tanh").
    """
    lay = _row_layout(kernel, kept, rows, runs, row_expert, slots)
    lay.approximate = approximate
    return lay


def _row_layout(kernel: str, kept: torch.Tensor, rows: int, runs: Sequence[int] | None,
                row_expert: torch.Tensor | None, slots: int) -> RowLayout:
    if kernel == "loop":
        return RowLayout("loop", rows, runs=tuple(runs))
    num_experts = kept.shape[0]
    ends = kept.cumsum(0)  # (E,)
    index = torch.arange(rows, device=kept.device)  # (R,)
    if row_expert is None:
        row_expert = torch.searchsorted(ends, index, right=True)  # (R,) in 0..E
    if kernel == "grouped":
        return RowLayout("grouped", rows, offs=ends.to(torch.int32), row_expert=row_expert)
    starts = ends - kept  # (E,)
    expert = row_expert.clamp(max=num_experts - 1)
    slot_of_row = torch.where(row_expert < num_experts, expert * slots + index - starts[expert],
                              num_experts * slots)  # (R,)
    position = torch.arange(slots, device=kept.device).expand(num_experts, slots)  # (E, C)
    row_of_slot = torch.where(position < kept.unsqueeze(1), starts.unsqueeze(1) + position, rows)  # (E, C)
    return RowLayout("padded", rows, offs=ends.to(torch.int32), row_expert=row_expert,
                     slot_of_row=slot_of_row, row_of_slot=row_of_slot.reshape(-1), slots=slots)


def ffn_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                lay: RowLayout) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y[r] = gelu(x[r] @ w1[e] + b1[e]) @ w2[e] + b2[e] for each row r of expert e; zero on
    spare rows. x (R, D) -> y (R, D), and what backward needs, to be saved and handed back
    to ffn_backward as it is: the hidden activations before and after GELU, [pre, act] of
    (R, H) for grouped and (E, C, H) for padded, a pair per chunk of experts for loop
    (see expert_loop.loop_forward)."""
    if lay.kernel == "loop":
        return loop_forward(x, w1, b1, w2, b2, lay.runs, lay.approximate)
    if lay.kernel == "grouped":
        pre = torch._grouped_mm(x, w1, offs=lay.offs) + _per_row(b1, lay.row_expert)  # (R, H)
        act = F.gelu(pre, approximate=lay.approximate)
        y = torch._grouped_mm(act, w2, offs=lay.offs) + _per_row(b2, lay.row_expert)  # (R, D)
        return _zero_spare(y, lay), [pre, act]
    e, c = w1.shape[0], lay.slots
    buf = _take_rows(x, lay.row_of_slot).view(e, c, x.shape[1])  # (E, C, D), zeros in empty slots
    pre = torch.baddbmm(b1.unsqueeze(1), buf, w1)  # (E, C, H)
    act = F.gelu(pre, approximate=lay.approximate)
    y = torch.baddbmm(b2.unsqueeze(1), act, w2)  # (E, C, D)
    return _take_rows(y.view(e * c, y.shape[2]), lay.slot_of_row), [pre, act]  # (R, D)


def ffn_backward(g: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 saved: Sequence[torch.Tensor], lay: RowLayout) -> tuple[torch.Tensor, ...]:
    """Gradients (x, w1, b1, w2, b2) of ffn_forward, given g (R, D) (spare rows: any finite
    values, never read) and the tensors ffn_forward saved. An expert without rows gets zero
    weight and bias gradients; spare rows of the x gradient are zero."""
    if lay.kernel == "loop":
        return loop_backward(g, x, w1, w2, saved, lay.runs, lay.approximate)
    pre, act = saved
    if lay.kernel == "grouped":
        gw2 = _zero_empty(torch._grouped_mm(act.t(), g, offs=lay.offs), lay.offs)  # (E, H, D)
        gb2 = _sum_per_expert(g, lay)  # (E, D)
        g_pre = torch.ops.aten.gelu_backward(torch._grouped_mm(g, w2.transpose(1, 2), offs=lay.offs), pre,
                                             approximate=lay.approximate)
        g_pre = _zero_spare(g_pre, lay)  # (R, H): garbage past M would spoil the bias sums
        gw1 = _zero_empty(torch._grouped_mm(x.t(), g_pre, offs=lay.offs), lay.offs)  # (E, D, H)
        gb1 = _sum_per_expert(g_pre, lay)  # (E, H)
        gx = _zero_spare(torch._grouped_mm(g_pre, w1.transpose(1, 2), offs=lay.offs), lay)  # (R, D)
        return gx, gw1, gb1, gw2, gb2
    e, c = w1.shape[0], lay.slots
    buf = _take_rows(x, lay.row_of_slot).view(e, c, x.shape[1])  # (E, C, D), as in forward
    g_y = _take_rows(g, lay.row_of_slot).view(e, c, g.shape[1])  # (E, C, D), zeros in empty slots
    gw2 = torch.bmm(act.transpose(1, 2), g_y)  # (E, H, D)
    gb2 = g_y.sum(1)
    g_pre = torch.ops.aten.gelu_backward(torch.bmm(g_y, w2.transpose(1, 2)), pre,
                                         approximate=lay.approximate)  # (E, C, H)
    gw1 = torch.bmm(buf.transpose(1, 2), g_pre)  # (E, D, H)
    gb1 = g_pre.sum(1)
    g_buf = torch.bmm(g_pre, w1.transpose(1, 2)).view(e * c, x.shape[1])  # (E*C, D)
    return _take_rows(g_buf, lay.slot_of_row), gw1, gb1, gw2, gb2


def _zero_spare(t: torch.Tensor, lay: RowLayout) -> torch.Tensor:
    """t (R, X) with its spare rows zeroed: torch._grouped_mm leaves rows past the last
    offset unwritten (garbage, possibly NaN)."""
    return torch.where((lay.row_expert < lay.num_experts).unsqueeze(1), t, t.new_zeros(()))


def _take_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """src (S, D) rows at index, where index S means a row of zeros."""
    return torch.cat([src, src.new_zeros(1, src.shape[1])]).index_select(0, index)


def _per_row(bias: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
    """(R, X) each row's expert's bias; zeros for spare rows (expert id E)."""
    return _take_rows(bias, row_expert)


def _sum_per_expert(g: torch.Tensor, lay: RowLayout) -> torch.Tensor:
    """(E, X) sums of g's (R, X) rows per expert (spare rows are zero): a one-hot matmul,
    deterministic where an index_add would accumulate with atomics on a GPU."""
    experts = torch.arange(lay.num_experts, device=g.device)
    one_hot = (lay.row_expert.unsqueeze(1) == experts).to(g.dtype)  # (R, E); F.one_hot checks values (a sync)
    return one_hot.t() @ g


def _zero_empty(grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Weight gradients (E, ., .) with exact zeros for experts without rows: a grouped kernel
    need not write a group whose contraction length is zero."""
    empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0  # (E,)
    return torch.where(empty.view(-1, 1, 1), grad.new_zeros(()), grad)


class _ExpertFFN(torch.autograd.Function):
    """ffn_forward / ffn_backward on rows that all belong to experts (R = M), runs on the host."""

    @staticmethod
    def forward(ctx, x, kept, w1, b1, w2, b2, kernel: str, runs: tuple[int, ...], approximate: str = "none"):
        lay = row_layout(kernel, kept, x.shape[0], runs, approximate=approximate)
        y, saved = ffn_forward(x, w1, b1, w2, b2, lay)
        ctx.save_for_backward(x, w1, w2, *lay.tensors(), *saved)
        ctx.lay = lay.without_tensors()
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, w1, w2, *rest = ctx.saved_tensors
        lay, saved = ctx.lay.restored(rest)
        gx, gw1, gb1, gw2, gb2 = ffn_backward(g.contiguous(), x, w1, w2, saved, lay)
        return gx, None, gw1, gb1, gw2, gb2, None, None, None


# ----------------------------------------------------------------------------
# Whether torch._grouped_mm can run the experts
# ----------------------------------------------------------------------------
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GROUPED_PROBES: dict[tuple, bool] = {}


def _check_grouped(dtype: torch.dtype, dim: int, hidden_dim: int) -> None:
    """What torch._grouped_mm takes: 16-bit or float32 rows whose byte strides are multiples of 16."""
    if not hasattr(torch, "_grouped_mm"):
        raise ValueError(f"this torch ({torch.__version__}) has no torch._grouped_mm; "
                         "use expert_backend='loop' or 'padded'")
    if dtype not in _GROUPED_DTYPES:
        raise ValueError(f"the grouped expert backend computes in float32, bfloat16 or float16, "
                         f"not {dtype}; use expert_backend='loop' or 'padded'")
    size = torch.empty((), dtype=dtype).element_size()
    if (dim * size) % 16 or (hidden_dim * size) % 16:
        raise ValueError(f"the grouped expert backend needs widths whose rows are multiples of 16 bytes "
                         f"(dim {dim}, hidden {hidden_dim} in {dtype}); use expert_backend='loop' or 'padded'")


def _grouped_mm_is_sync_free(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm reads the offsets on the device only in bfloat16 on CUDA sm90/sm100
    (its other CUDA cases copy them to the host), and torch.compile can trace it only in
    bfloat16 (its meta kernel checks the dtype)."""
    if dtype != torch.bfloat16:
        return False
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10))


def grouped_mm_works(device: torch.device, dtype: torch.dtype, dim: int, hidden_dim: int) -> bool:
    """Whether torch._grouped_mm can run the experts here.

    On a CPU the op loops over the groups with ordinary matmuls: its
    requirements suffice. On a GPU the first call for each (device, dtype,
    sizes) checks the grouped kernels, forward and backward, against the
    loop on random data and logs the decision (with the error or the largest
    difference when it says no); inside torch.compile, where nothing can be
    run, a key not yet checked counts as working.
    """
    try:
        _check_grouped(dtype, dim, hidden_dim)
    except ValueError:
        return False
    if device.type == "cpu":
        return True
    key = (str(device), dtype, dim, hidden_dim)
    if key not in _GROUPED_PROBES:
        if torch.compiler.is_compiling():
            return True
        # The first call may come from evaluation (no_grad / inference mode) or under autocast.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            works, reason = _probe_grouped_mm(device, dtype, dim, hidden_dim)
        _GROUPED_PROBES[key] = works
        _log.info("grouped expert matmuls on %s in %s at D=%d H=%d: %s (%s)", device, dtype, dim, hidden_dim,
                  "used" if works else "not used, the per-expert loop runs instead", reason)
    return _GROUPED_PROBES[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype, dim: int, hidden_dim: int) -> tuple[bool, str]:
    """Run both kernels, forward and backward, on the same random rows (an empty expert
    included); (agree, why)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    runs = (16, 0, 32)
    tensors = [torch.randn(*shape, generator=gen).to(device, dtype) * 0.1 for shape in (
        (sum(runs), dim), (3, dim, hidden_dim), (3, hidden_dim), (3, hidden_dim, dim), (3, dim))]
    kept = torch.tensor(runs, device=device)
    results = []
    for kernel in ("grouped", "loop"):
        inputs = [t.clone().requires_grad_() for t in tensors]
        try:
            out = _ExpertFFN.apply(inputs[0], kept, *inputs[1:], kernel, runs)
            out.float().square().sum().backward()
        except (RuntimeError, NotImplementedError) as err:
            return False, f"{kernel} kernel failed: {str(err).splitlines()[0]}"
        results.append([out, *(t.grad for t in inputs)])
    names = ("output", "x grad", "w1 grad", "b1 grad", "w2 grad", "b2 grad")
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, a, b in zip(names, *results):
        a, b = a.float(), b.float()
        if not torch.allclose(a, b, rtol=tol, atol=tol):
            return False, f"{name} differs by up to {(a - b).abs().max().item():.3g} (tolerance {tol})"
    return True, "forward and backward match the loop"
