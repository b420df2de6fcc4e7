"""`widenet bench model`: training throughput of a preset on random input."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.registry import count_parameters, create_model
from ..runtime import resolve_device


@dataclass
class ModelBenchResult:
    model: str
    batch_size: int
    steps: int
    seconds: float
    images_per_s: float
    params: int
    device: str


def bench_model(name: str, batch_size: int = 64, steps: int = 10, warmup: int = 2,
                device: str = "auto", **overrides) -> ModelBenchResult:
    """Images/s of AdamW training steps (forward, loss + 0.01 * aux, backward, step)."""
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ValueError("--batch-size and --steps must be >= 1")
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = create_model(name, **overrides).to(dev).train()
    cfg = model.cfg
    images = torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device=dev)
    labels = torch.randint(0, cfg.num_classes, (batch_size,), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        out = model(images)
        loss = F.cross_entropy(out.logits, labels) + 0.01 * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    return ModelBenchResult(name, batch_size, steps, seconds, batch_size * steps / seconds,
                            count_parameters(model), str(dev))
