"""Where an MoE layer's training time goes, against the dense FFN of equal active FLOPs.

Times forward + backward of, interleaved round by round (widenet.bench.moe_bench):
    dense     the dense FFN D -> K*H -> D
    layer     the MoE layer as users get it (router, dispatch plan, experts, combine)
    experts   gather + experts + combine on a plan computed once (no router, no plan)
    ffn       the experts alone, on rows already grouped by expert (no gather, no combine)
    router    the router alone (gate weights and balance loss)
and prints each one's median and its median per-round ratio to dense.

    python scripts/moe-breakdown.py [--tokens 2176] [--dim 64] [--hidden 256] [--top-k 1] [--rounds 60]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from widenet.bench.moe_bench import interleaved_times, median_ratio
from widenet.layers.dispatch import RoutedExperts, plan_dispatch
from widenet.layers.experts import _ExpertFFN
from widenet.layers.mlp import Mlp
from widenet.layers.moe import MoE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2176)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--rounds", type=int, default=60)
    a = p.parse_args()
    torch.manual_seed(0)
    n, k = a.tokens, a.top_k
    moe = MoE(a.dim, a.hidden, num_experts=a.experts, top_k=k).train()
    dense = Mlp(a.dim, k * a.hidden)
    x = torch.randn(n, a.dim, requires_grad=True)
    route = moe.router(x)
    plan = plan_dispatch(route.expert_index, route.counts, moe.capacity(n), host=True)
    weight = route.combine_weight.detach().reshape(-1).clone().requires_grad_()  # (A,)
    ex = moe.experts
    rows = x.detach().repeat(k, 1)[:sum(plan.runs)].clone().requires_grad_()  # (M, D), taken as grouped by expert
    kept = torch.tensor(plan.runs)

    def layer() -> None:
        out = moe(x)
        (out.output.sum() + out.aux_loss).backward()

    def experts() -> None:
        RoutedExperts.apply(x, weight, plan.slot, plan.inverse, None, plan.kept, ex.w1, ex.b1, ex.w2, ex.b2,
                            "loop", plan.runs, 0, k, ex.approximate).sum().backward()

    def ffn() -> None:
        _ExpertFFN.apply(rows, kept, ex.w1, ex.b1, ex.w2, ex.b2, "loop", tuple(plan.runs), ex.approximate
                         ).sum().backward()

    def router() -> None:
        out = moe.router(x)
        (out.combine_weight.sum() + out.balance_loss).backward()

    steps = dict(dense=lambda: dense(x).sum().backward(), layer=layer, experts=experts, ffn=ffn, router=router)
    times = interleaved_times(steps, a.rounds, torch.device("cpu"))
    print(f"N {n}, D {a.dim}, H {a.hidden}, E {a.experts}, top-{k}, {torch.get_num_threads()} threads, "
          f"{a.rounds} rounds")
    for name, seconds in times.items():
        print(f"{name:8s} {statistics.median(seconds) * 1e3:7.3f} ms   {median_ratio(seconds, times['dense']):.3f}x dense")


if __name__ == "__main__":
    main()
