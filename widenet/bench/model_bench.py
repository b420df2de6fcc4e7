"""`widenet bench model`: training throughput of a preset on random input, and its FLOPs utilisation.

Model FLOPs per training image = 3 x the forward FLOPs counted by PyTorch's
FlopCounterMode (backward ~ twice the forward), active experts only. MFU =
achieved FLOP/s / the device's peak: given with --peak-tflops, or looked up
for known GPUs (dense bf16/fp16 tensor-core peaks from the vendors' sheets).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..analysis.flops import flops_per_image
from ..models.registry import count_parameters, create_model
from ..runtime import autocast, autocast_dtype, resolve_device

# Dense 16-bit tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                   "V100": 125.0, "T4": 65.0}


@dataclass
class ModelBenchResult:
    model: str
    batch_size: int
    steps: int
    seconds: float
    images_per_s: float
    params: int
    device: str
    amp: str | None = None
    train_flops_per_image: float = 0.0
    achieved_tflops: float = 0.0
    peak_tflops: float | None = None
    mfu: float | None = None


def peak_tflops(dev: torch.device) -> float | None:
    """The known 16-bit peak of this GPU, else None (CPUs: unknown)."""
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), None)


def bench_model(name: str, batch_size: int = 64, steps: int = 10, warmup: int = 2,
                device: str = "auto", amp: str = "auto", peak: float | None = None,
                **overrides) -> ModelBenchResult:
    """Images/s of AdamW training steps (forward, loss + 0.01 * aux, backward, step) and MFU.

    amp "auto" is bf16 autocast on GPUs (the router stays float32), off on CPUs.
    """
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ValueError("--batch-size and --steps must be >= 1")
    dev = resolve_device(device)
    dtype = autocast_dtype(amp, dev)
    torch.manual_seed(0)
    model = create_model(name, **overrides).to(dev).train()
    cfg = model.cfg
    images = torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device=dev)
    labels = torch.randint(0, cfg.num_classes, (batch_size,), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with autocast(dev, dtype):
            out = model(images)
            loss = F.cross_entropy(out.logits.float(), labels) + 0.01 * out.aux_loss
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
    speed = batch_size * steps / seconds
    train_flops = 3 * flops_per_image(model, (cfg.in_channels, cfg.image_size, cfg.image_size))
    achieved = train_flops * speed / 1e12
    peak = peak or peak_tflops(dev)
    return ModelBenchResult(name, batch_size, steps, seconds, speed, count_parameters(model), str(dev),
                            str(dtype).removeprefix("torch.") if dtype else None, train_flops, achieved, peak,
                            achieved / peak if peak else None)
