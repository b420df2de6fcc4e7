"""The loop kernel of the experts (layers/experts.py): each expert's rows through its FFN, one
expert after another, on a CPU or wherever the run lengths are on the host.

Shape legend (as in experts.py):
    x (R, D) rows grouped by expert: expert 0's n_0 rows, then expert 1's, ...; the first
      M = sum(runs) belong to experts, rows M..R-1 are spare and come out as zeros.
    w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D) the stacked weights.
The experts' hidden rows (pre- and post-GELU, what backward needs) are kept per chunk of
experts (chunks).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["CHUNK_BYTES", "chunks", "loop_backward", "loop_forward"]

# Bytes of hidden rows per chunk of experts (see chunks).
CHUNK_BYTES = 16 << 20


def chunks(runs: Sequence[int], hidden: int, itemsize: int) -> list[list[int]]:
    """The experts with rows, in order, cut into chunks whose hidden rows (sum of n_e x
    hidden) stay under CHUNK_BYTES; an expert that alone takes more is a chunk of its own.

    One buffer per chunk, GELU once per chunk: small layers keep one chunk (per-expert GELU
    calls, ~25 us of threading each, made a 2176-token training step up to 5% slower),
    while large ones get a buffer per expert (8192 tokens, D 192, H 768, top-2: the layer
    in 0.80-0.82x the time of one 50 MB buffer; 25 MB chunks of two experts: 0.97x).
    glibc maps blocks of 32 MiB and more afresh at every call, so each first write to one
    of their pages faults, and a buffer that large leaves the caches between its writes.
    Measured by sweeping the limit (docs/experiments.md, 2026-12-07)."""
    cut: list[list[int]] = []
    size = 0
    for e, n_e in enumerate(runs):
        if not n_e:
            continue
        nbytes = n_e * hidden * itemsize
        if not cut or size + nbytes >= CHUNK_BYTES:
            cut.append([])
            size = 0
        cut[-1].append(e)
        size += nbytes
    return cut


def loop_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 runs: Sequence[int], approximate: str = "none") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y (R, D) for rows x (R, D) in runs of n_e rows per expert, and what backward needs:
    [pre, act] of each chunk, in order. Per chunk of experts (chunks): one addmm per expert
    into the chunk's hidden buffer, GELU once over the buffer, one addmm per expert into the
    output. Views are cut in one call each (split_with_sizes, unbind): at small widths a CPU
    spends as much on per-op overhead as on arithmetic."""
    m = sum(runs)
    out = x.new_empty(x.shape[0], w2.shape[-1])
    out[m:] = 0
    xs, outs = x[:m].split_with_sizes(runs), out[:m].split_with_sizes(runs)
    w1s, b1s, w2s, b2s = w1.unbind(0), b1.unbind(0), w2.unbind(0), b2.unbind(0)
    saved = []
    cut = chunks(runs, w1.shape[-1], x.element_size()) if x.is_cpu else [[e for e, n_e in enumerate(runs) if n_e]]
    for chunk in cut:  # on a GPU one chunk: what the chunks avoid is the CPU's
        sizes = [runs[e] for e in chunk]
        pre = x.new_empty(sum(sizes), w1.shape[-1])  # (rows of the chunk, H)
        for e, pre_e in zip(chunk, pre.split_with_sizes(sizes)):
            torch.addmm(b1s[e], xs[e], w1s[e], out=pre_e)
        act = F.gelu(pre, approximate=approximate)
        for e, act_e in zip(chunk, act.split_with_sizes(sizes)):
            torch.addmm(b2s[e], act_e, w2s[e], out=outs[e])
        saved += [pre, act]
    return out, saved


def loop_backward(g: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  saved: Sequence[torch.Tensor], runs: Sequence[int], approximate: str = "none"
                  ) -> tuple[torch.Tensor, ...]:
    """Gradients (x, w1, b1, w2, b2) of loop_forward given g (R, D) and what it saved; zero for
    spare rows and for experts without rows. The chunks are read off the saved buffers' rows,
    so a CHUNK_BYTES changed in between cannot mismatch them."""
    m = sum(runs)
    gx = torch.empty_like(x)
    gx[m:] = 0
    new = torch.empty_like if all(runs) else torch.zeros_like  # zero: an expert without rows
    gw1, gw2 = new(w1), new(w2)
    gb1, gb2 = new(w1[:, 0]), new(w2[:, 0])
    gs, x_ts, gxs = g[:m].split_with_sizes(runs), x[:m].t().split_with_sizes(runs, 1), gx[:m].split_with_sizes(runs)
    w1ts, gw1s, gb1s = w1.transpose(1, 2).unbind(0), gw1.unbind(0), gb1.unbind(0)
    w2ts, gw2s, gb2s = w2.transpose(1, 2).unbind(0), gw2.unbind(0), gb2.unbind(0)
    with_rows = iter(e for e, n_e in enumerate(runs) if n_e)
    for pre, act in zip(saved[0::2], saved[1::2]):  # (rows of the chunk, H)
        chunk, rows = [], 0
        while rows < pre.shape[0]:
            chunk.append(next(with_rows))
            rows += runs[chunk[-1]]
        sizes = [runs[e] for e in chunk]
        g_act = g.new_empty(pre.shape)
        for e, act_t, g_act_e in zip(chunk, act.t().split_with_sizes(sizes, 1), g_act.split_with_sizes(sizes)):
            torch.mm(act_t, gs[e], out=gw2s[e])
            torch.sum(gs[e], 0, out=gb2s[e])
            torch.mm(gs[e], w2ts[e], out=g_act_e)
        g_pre = torch.ops.aten.gelu_backward.grad_input(g_act, pre, approximate=approximate,
                                                        grad_input=g_act)  # in place
        for e, g_pre_e in zip(chunk, g_pre.split_with_sizes(sizes)):
            torch.mm(x_ts[e], g_pre_e, out=gw1s[e])
            torch.sum(g_pre_e, 0, out=gb1s[e])
            torch.mm(g_pre_e, w1ts[e], out=gxs[e])
    return gx, gw1, gb1, gw2, gb2
