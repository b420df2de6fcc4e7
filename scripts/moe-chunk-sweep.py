"""The loop kernel's chunk limit (layers/expert_loop.py CHUNK_BYTES), swept in one process.

Each variant runs the same MoE layer (forward + backward) or the same training
step with the limit set to its value; rounds interleave the variants in a
rotating order (widenet.bench.moe_bench.interleaved_times), and each variant's
time is printed as the median of its per-round ratios to "one" (no limit: one
hidden buffer for all experts, the kernel before the chunks).

    python scripts/moe-chunk-sweep.py [--limits-mib 0 8 16 32] [--rounds 16] [--model-rounds 30]

0 MiB means a buffer per expert. Cases: the MoE layer at 8192 tokens, D 192,
H 768, top-2 (`widenet bench moe`'s default), at 2176 tokens, D 64, H 256,
top-1 and top-2, and `widenet_tiny` training steps with the README recipe's
settings at batch 128, top-1 (2176 tokens) and batch 512, top-2.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

import widenet.layers.expert_loop as expert_loop
from widenet.bench.model_bench import _TrainStep
from widenet.bench.moe_bench import interleaved_times, median_ratio
from widenet.layers.moe import MoE

ONE = 1 << 62  # bytes: no limit


def sweep(step: Callable[[], None], limits: dict[str, int], rounds: int) -> dict[str, float]:
    """Median per-round time ratio of each limit to ONE."""
    def at(limit: int) -> Callable[[], None]:
        def run() -> None:
            expert_loop.CHUNK_BYTES = limit
            step()
        return run

    times = interleaved_times({name: at(limit) for name, limit in limits.items()}, rounds, torch.device("cpu"))
    return {name: median_ratio(times[name], times["one"]) for name in limits if name != "one"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limits-mib", type=float, nargs="+", default=[0, 8, 16, 32])
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--model-rounds", type=int, default=30)
    a = p.parse_args()
    limits = {f"{m:g} MiB": max(1, int(m * 2**20)) for m in a.limits_mib}
    limits["one"] = ONE
    print("time / one buffer for all experts (medians of per-round ratios)")
    print(f"{'case':34s}" + "".join(f"{name:>10s}" for name in limits if name != "one"))
    for tokens, dim, hidden, k, rounds in ((8192, 192, 768, 2, a.rounds), (2176, 64, 256, 1, 4 * a.rounds),
                                           (2176, 64, 256, 2, 4 * a.rounds)):
        torch.manual_seed(0)
        moe = MoE(dim, hidden, num_experts=4, top_k=k).train()
        x = torch.randn(tokens, dim, requires_grad=True)

        def layer(moe=moe, x=x) -> None:
            out = moe(x)
            (out.output.sum() + out.aux_loss).backward()

        ratios = sweep(layer, limits, rounds)
        print(f"{f'layer {tokens} x D {dim} x H {hidden}, top-{k}':34s}" + "".join(f"{r:10.3f}" for r in ratios.values()),
              flush=True)
    recipe = dict(stem="conv", patch_size=8, stem_width=96, drop_path=0.1)
    for batch, k in ((128, 1), (512, 2)):
        step = _TrainStep("widenet_tiny", batch, torch.device("cpu"), None, False, dict(recipe, top_k=k))
        ratios = sweep(step, limits, a.model_rounds)
        print(f"{f'widenet_tiny step, batch {batch}, top-{k}':34s}" + "".join(f"{r:10.3f}" for r in ratios.values()),
              flush=True)


if __name__ == "__main__":
    main()
