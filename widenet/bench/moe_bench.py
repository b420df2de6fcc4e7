"""`widenet bench moe`: the MoE layer against a dense FFN and two other dispatches.

All run forward + backward on the same tokens (N, D):
  moe      widenet.MoE as users get it (expert_backend "auto")
  loop, padded, grouped
           the same layer with each expert kernel forced (layers/experts.py;
           grouped only where torch._grouped_mm runs)
  dense    Linear D -> k*H -> D: the same active FLOPs per token, no routing
  einsum   GShard-style one-hot dispatch/combine tensors of shape (N, E, C)
  mixtral  a Python loop over experts with boolean masks and index_add_
           (how Hugging Face's Mixtral/Switch blocks dispatch; no capacity)
Each round times every implementation once, in an order that rotates from
round to round, so slow spells of a noisy machine hit all of them alike; a
ratio is the median over rounds of the two times of that round. Memory is
what autograd saves for backward (bytes of distinct saved tensors), plus
the device's peak on CUDA.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..layers.experts import grouped_mm_works
from ..layers.mlp import Mlp
from ..layers.moe import MoE, MoEConfig
from ..memory import check_fits_memory, check_model_fits
from ..runtime import autocast, autocast_dtype
from ..settings import check_types

KERNELS = ("loop", "padded", "grouped")


@dataclass
class MoEBenchConfig:
    tokens: int = 8192
    dim: int = 192
    hidden: int = 768
    experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.2
    repeats: int = 7
    einsum_repeats: int = 2
    device: str = "cpu"
    amp: str = "off"  # "bf16" / "fp16": autocast, as training on a GPU runs (the router stays float32)
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("tokens", "dim", "hidden", "repeats", "einsum_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        self.moe_config()  # the MoE's own checks: experts, top-k, capacity

    def moe_config(self) -> MoEConfig:
        return MoEConfig(num_experts=self.experts, top_k=self.top_k, capacity_factor=self.capacity_factor)


def einsum_dispatch(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """GShard one-hot dispatch with the same routing/capacity rules as `moe`."""
    n, e, k = x.shape[0], moe.num_experts, moe.top_k
    route = moe.router(x)
    cap = moe.capacity(n)
    expert = route.expert_index  # (K, N) choice-major priority
    position = (F.one_hot(expert, e).reshape(k * n, e).cumsum(0) - 1).reshape(k, n, e)
    position = position.gather(-1, expert.unsqueeze(-1)).squeeze(-1)  # (K, N) slot in its expert
    kept = position < cap
    token = torch.arange(n, device=x.device).expand(k, n)
    where = (token[kept], expert[kept], position[kept])
    dispatch = x.new_zeros(n, e, cap).index_put(where, x.new_ones(()).expand(where[0].shape))  # (N, E, C)
    weight = route.combine_weight[kept].to(x.dtype)
    combine = x.new_zeros(n, e, cap).index_put(where, weight)  # (N, E, C)
    ex = moe.experts
    xin = torch.einsum("nec,nd->ecd", dispatch, x)  # (E, C, D)
    h = F.gelu(torch.einsum("ecd,edh->ech", xin, ex.w1) + ex.b1[:, None])  # (E, C, H)
    y = torch.einsum("ech,ehd->ecd", h, ex.w2) + ex.b2[:, None]  # (E, C, D)
    return torch.einsum("nec,ecd->nd", combine, y)


def mixtral_dispatch(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Mask-and-loop over experts, dropless (Hugging Face Mixtral style)."""
    route = moe.router(x)
    ex = moe.experts
    out = torch.zeros_like(x)
    expert_mask = F.one_hot(route.expert_index, moe.num_experts).permute(2, 0, 1)  # (E, K, N)
    for e in range(moe.num_experts):
        choice, token = torch.where(expert_mask[e])
        if token.numel() == 0:
            continue
        h = F.gelu(x[token] @ ex.w1[e] + ex.b1[e])
        y = (h @ ex.w2[e] + ex.b2[e]) * route.combine_weight[choice, token, None]
        out.index_add_(0, token, y.to(x.dtype))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(step: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct tensors autograd saves during one forward."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.device)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(seen.values())


def interleaved_times(steps: dict[str, Callable[[], None]], rounds: int, device: torch.device,
                      limits: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Seconds of every step in every round (after one warm-up call each). Each round runs
    the steps once, in an order rotated by one from the round before; limits caps the
    rounds of slow steps."""
    names = list(steps)
    limits = limits or {}
    for name in names:
        steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if len(times[name]) >= limits.get(name, rounds):
                continue
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]."""
    return statistics.median(x / y for x, y in zip(a, b))


def run_moe_bench(cfg: MoEBenchConfig) -> dict:
    """Times (ms, medians), ratios (medians of per-round ratios) and memory of every implementation."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    check_model_fits(lambda: MoE(cfg.dim, cfg.hidden, config=cfg.moe_config()))
    moe = MoE(cfg.dim, cfg.hidden, config=cfg.moe_config()).to(device)
    if device.type == "cpu":  # a lower bound: the one-hot dispatch and combine tensors, the FFN's saved rows
        n, slots = cfg.tokens, moe.capacity(cfg.tokens)
        check_fits_memory(4 * (2 * n * cfg.experts * slots + n * (2 * cfg.dim + 2 * cfg.top_k * cfg.hidden)),
                          f"the activations of {n:,} tokens (the one-hot einsum's two {n:,} x {cfg.experts} x "
                          f"{slots:,} tensors among them)")
    dense = Mlp(cfg.dim, cfg.top_k * cfg.hidden).to(device)
    x = torch.randn(cfg.tokens, cfg.dim, device=device, requires_grad=True)

    forwards: dict[str, Callable[[], torch.Tensor]] = {"moe": lambda: _with_aux(moe(x))}
    for kernel in KERNELS:
        if kernel != "grouped" or grouped_mm_works(device, x.dtype, cfg.dim, cfg.hidden):
            twin = copy.deepcopy(moe)
            twin.experts.backend = kernel
            forwards[kernel] = lambda m=twin: _with_aux(m(x))
    forwards.update({
        "dense": lambda: dense(x).sum(),
        "einsum": lambda: einsum_dispatch(moe, x).sum(),
        "mixtral": lambda: mixtral_dispatch(moe, x).sum(),
    })
    result: dict = {"config": asdict(cfg), "capacity": moe.capacity(cfg.tokens)}
    for name, fwd in forwards.items():
        with autocast(device, autocast_dtype(cfg.amp, device)):
            result[f"{name}_saved_mb"] = saved_bytes(fwd) / 2**20
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    amp = autocast_dtype(cfg.amp, device)

    def step(forward: Callable[[], torch.Tensor]) -> None:
        with autocast(device, amp):
            out = forward()  # a scalar of the layer's output (and aux loss)
        out.backward()

    times = interleaved_times({name: lambda f=fwd: step(f) for name, fwd in forwards.items()},
                              cfg.repeats, device, {"einsum": cfg.einsum_repeats})
    for name, seconds in times.items():
        result[f"{name}_ms"] = statistics.median(seconds) * 1000.0
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["ratio_vs_dense"] = median_ratio(times["moe"], times["dense"])
    result["speedup_vs_einsum"] = median_ratio(times["einsum"], times["moe"])
    result["ratio_vs_mixtral"] = median_ratio(times["moe"], times["mixtral"])
    for kernel in KERNELS:
        if kernel in times:
            result[f"{kernel}_vs_dense"] = median_ratio(times[kernel], times["dense"])
    result["active_gflop_per_step"] = 3 * 2 * 2 * cfg.tokens * cfg.top_k * cfg.dim * cfg.hidden / 1e9
    return result


def _with_aux(out) -> torch.Tensor:
    return out.output.sum() + out.aux_loss


def format_moe_bench(r: dict) -> str:
    c = r["config"]
    lines = [f"MoE benchmark: N={c['tokens']} D={c['dim']} H={c['hidden']} E={c['experts']} "
             f"k={c['top_k']} C={c['capacity_factor']} (capacity {r['capacity']}/expert) on {c['device']}"
             + (f" under {c['amp']} autocast" if c.get("amp", "off") != "off" else "") + ", "
             f"{c['repeats']} interleaved rounds",
             f"{'impl':<8}{'fwd+bwd ms':>12}{'saved MB':>11}{'/ dense':>9}"]
    for name in ("moe", *KERNELS, "dense", "einsum", "mixtral"):
        if name + "_ms" not in r:
            continue
        ratio = r["ratio_vs_dense"] if name == "moe" else r.get(f"{name}_vs_dense")
        lines.append(f"{name:<8}{r[name + '_ms']:>12.2f}{r[name + '_saved_mb']:>11.1f}"
                     + (f"{ratio:>9.3f}" if ratio is not None else ""))
    lines.append(f"moe / dense = {r['ratio_vs_dense']:.3f}   einsum / moe = {r['speedup_vs_einsum']:.1f}x   "
                 f"moe / mixtral = {r['ratio_vs_mixtral']:.3f}   (medians of per-round ratios)")
    return "\n".join(lines)
