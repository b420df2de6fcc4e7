"""`widenet bench moe`: the MoE layer against a dense FFN and two other dispatches.

All run forward + backward on the same tokens (N, D):
  moe     widenet.MoE (sorted dispatch, capacity, noisy top-k), one matmul
          pair per expert
  grouped the same MoE with one torch._grouped_mm per projection (the GPU
          fast path; left out where the op fails its probe on the device)
  dense   Linear D -> k*H -> D: the same active FLOPs per token, no routing
  einsum  GShard-style one-hot dispatch/combine tensors of shape (N, E, C)
  loop    a Python loop over experts with boolean masks and index_add_
          (how Hugging Face's Mixtral/Switch blocks dispatch; no capacity)
Times are medians over repeats, measured in one process so that ratios are
comparable on a noisy machine. Memory is what autograd saves for backward
(bytes of distinct saved tensors), plus the device's peak on CUDA.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..layers.mlp import Mlp
from ..layers.moe import MoE, grouped_mm_works


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
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "dim", "hidden", "experts", "top_k", "repeats", "einsum_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.experts:
            raise ValueError(f"--top-k {self.top_k} exceeds --experts {self.experts}")
        if not self.capacity_factor > 0:
            raise ValueError(f"--capacity-factor must be > 0, got {self.capacity_factor}")


def einsum_dispatch(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """GShard one-hot dispatch with the same routing/capacity rules as `moe`."""
    n, e, k = x.shape[0], moe.num_experts, moe.top_k
    route = moe.router(x)
    cap = moe.capacity(n)
    expert = route.expert_index.t()  # (K, N) choice-major priority
    position = (F.one_hot(expert, e).reshape(k * n, e).cumsum(0) - 1).reshape(k, n, e)
    position = position.gather(-1, expert.unsqueeze(-1)).squeeze(-1)  # (K, N) slot in its expert
    kept = position < cap
    token = torch.arange(n, device=x.device).expand(k, n)
    where = (token[kept], expert[kept], position[kept])
    dispatch = x.new_zeros(n, e, cap).index_put(where, x.new_ones(()).expand(where[0].shape))  # (N, E, C)
    weight = route.combine_weight.t()[kept].to(x.dtype)
    combine = x.new_zeros(n, e, cap).index_put(where, weight)  # (N, E, C)
    ex = moe.experts
    xin = torch.einsum("nec,nd->ecd", dispatch, x)  # (E, C, D)
    h = F.gelu(torch.einsum("ecd,edh->ech", xin, ex.w1) + ex.b1[:, None])  # (E, C, H)
    y = torch.einsum("ech,ehd->ecd", h, ex.w2) + ex.b2[:, None]  # (E, C, D)
    return torch.einsum("nec,ecd->nd", combine, y)


def loop_dispatch(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Mask-and-loop over experts, dropless (Hugging Face Mixtral style)."""
    route = moe.router(x)
    ex = moe.experts
    out = torch.zeros_like(x)
    expert_mask = F.one_hot(route.expert_index, moe.num_experts).permute(2, 1, 0)  # (E, K, N)
    for e in range(moe.num_experts):
        choice, token = torch.where(expert_mask[e])
        if token.numel() == 0:
            continue
        h = F.gelu(x[token] @ ex.w1[e] + ex.b1[e])
        y = (h @ ex.w2[e] + ex.b2[e]) * route.combine_weight[token, choice, None]
        out.index_add_(0, token, y.to(x.dtype))
    return out


def _time(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


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


def run_moe_bench(cfg: MoEBenchConfig) -> dict:
    """Times (ms), ratios and memory of every implementation."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    moe = MoE(cfg.dim, cfg.hidden, cfg.experts, cfg.top_k, capacity_factor=cfg.capacity_factor,
              expert_backend="loop").to(device)
    dense = Mlp(cfg.dim, cfg.top_k * cfg.hidden).to(device)
    x = torch.randn(cfg.tokens, cfg.dim, device=device, requires_grad=True)

    forwards: dict[str, Callable[[], torch.Tensor]] = {
        "moe": lambda: _with_aux(moe(x)),
        **_grouped_twin(moe, x),
        "dense": lambda: dense(x).sum(),
        "einsum": lambda: einsum_dispatch(moe, x).sum(),
        "loop": lambda: loop_dispatch(moe, x).sum(),
    }
    result: dict = {"config": asdict(cfg), "capacity": moe.capacity(cfg.tokens)}
    for name, fwd in forwards.items():
        repeats = cfg.einsum_repeats if name == "einsum" else cfg.repeats
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result[f"{name}_ms"] = _time(lambda: fwd().backward(), repeats, device)
        result[f"{name}_saved_mb"] = saved_bytes(fwd) / 2**20
        if device.type == "cuda":
            result[f"{name}_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["ratio_vs_dense"] = result["moe_ms"] / result["dense_ms"]
    result["speedup_vs_einsum"] = result["einsum_ms"] / result["moe_ms"]
    result["ratio_vs_loop"] = result["moe_ms"] / result["loop_ms"]
    if "grouped_ms" in result:
        result["grouped_speedup"] = result["moe_ms"] / result["grouped_ms"]
    result["active_gflop_per_step"] = 3 * 2 * 2 * cfg.tokens * cfg.top_k * cfg.dim * cfg.hidden / 1e9
    return result


def _grouped_twin(moe: MoE, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """{"grouped": forward of a copy of moe on the grouped-matmul backend}, or {} where it cannot run."""
    if not grouped_mm_works(x.device, x.dtype, moe.dim, moe.experts.w1.shape[2]):
        return {}
    twin = copy.deepcopy(moe)
    twin.experts.backend = "grouped"
    return {"grouped": lambda: _with_aux(twin(x))}


def _with_aux(out) -> torch.Tensor:
    return out.output.sum() + out.aux_loss


def format_moe_bench(r: dict) -> str:
    c = r["config"]
    lines = [f"MoE benchmark: N={c['tokens']} D={c['dim']} H={c['hidden']} E={c['experts']} "
             f"k={c['top_k']} C={c['capacity_factor']} (capacity {r['capacity']}/expert) on {c['device']}",
             f"{'impl':<8}{'fwd+bwd ms':>12}{'saved MB':>11}"]
    for name in ("moe", "grouped", "dense", "einsum", "loop"):
        if name + "_ms" not in r:
            continue
        lines.append(f"{name:<8}{r[name + '_ms']:>12.1f}{r[name + '_saved_mb']:>11.1f}")
    lines.append(f"moe / dense = {r['ratio_vs_dense']:.3f}   einsum / moe = {r['speedup_vs_einsum']:.1f}x   "
                 f"moe / loop = {r['ratio_vs_loop']:.3f}")
    if "grouped_speedup" in r:
        lines.append(f"grouped matmuls: {r['grouped_speedup']:.2f}x the per-expert loop")
    return "\n".join(lines)
