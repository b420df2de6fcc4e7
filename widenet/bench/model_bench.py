"""`widenet bench model`: training throughput of presets on random input, and FLOPs utilisation.

Model FLOPs per training image = 3 x the forward FLOPs counted by PyTorch's
FlopCounterMode (backward ~ twice the forward), active experts only. MFU =
achieved FLOP/s / the device's peak: given with --peak-tflops, or looked up
for known GPUs (dense bf16/fp16 tensor-core peaks from the vendors' sheets).

Several models are timed interleaved: each round runs one training step of
every model, in an order rotated from round to round, so that a noisy
machine's slow spells hit them alike; images/s come from the median step,
and the ratio to the first model is the median of the per-round ratios.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..analysis.flops import flops_per_image
from ..memory import check_activations_fit
from ..models.registry import count_parameters, create_model, require_preset_kind, settings_for_each
from ..runtime import autocast, autocast_dtype, compile_model, resolve_device
from ..settings import repeated
from ..train.update import apply_update
from .moe_bench import interleaved_times, median_ratio

# Dense 16-bit tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                   "V100": 125.0, "T4": 65.0}


@dataclass
class ModelBenchResult:
    model: str
    batch_size: int
    steps: int
    seconds: float  # median seconds per step
    images_per_s: float
    params: int
    device: str
    amp: str | None = None
    train_flops_per_image: float = 0.0
    achieved_tflops: float = 0.0
    peak_tflops: float | None = None
    mfu: float | None = None
    compiled: bool = False
    ratio_vs_first: float = 1.0  # images/s relative to the first model, median of per-round ratios


def peak_tflops(dev: torch.device) -> float | None:
    """The known 16-bit peak of this GPU, else None (CPUs: unknown)."""
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), None)


def bench_model(name: str, batch_size: int = 64, steps: int = 10, warmup: int = 2,
                device: str = "auto", amp: str = "auto", peak: float | None = None,
                compile: bool = False, **overrides) -> ModelBenchResult:
    """Images/s of AdamW training steps (forward, loss + 0.01 * aux, backward, step) and MFU."""
    return bench_models([name], batch_size, steps, warmup, device, amp, peak, compile, **overrides)[0]


def bench_models(names: list[str], batch_size: int = 64, steps: int = 10, warmup: int = 2,
                 device: str = "auto", amp: str = "auto", peak: float | None = None,
                 compile: bool = False, **overrides) -> list[ModelBenchResult]:
    """bench_model for each name, their steps interleaved (see the module doc); the same
    settings (overrides) for every model, MoE settings (top_k=1) for those with MoE layers
    (models.registry.settings_for_each; refused when none has one). amp "auto" is bf16 autocast on
    GPUs (the router stays float32), off on CPUs. With compile, warm-up steps include the
    compilation."""
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ValueError("--batch-size and --steps must be >= 1")
    if not names:
        raise ValueError("name at least one model")
    if twice := repeated(names):
        raise ValueError(f"{', '.join(twice)} named more than once; a model timed against itself compares nothing")
    dev = resolve_device(device)
    dtype = autocast_dtype(amp, dev)
    settings = settings_for_each(names, overrides)
    runs = [_TrainStep(name, batch_size, dev, dtype, compile, settings[name]) for name in names]
    for run in runs:
        for _ in range(warmup):
            run()
    times = interleaved_times({f"{i}": run for i, run in enumerate(runs)}, steps, dev)
    results = []
    peak = peak or peak_tflops(dev)
    for i, run in enumerate(runs):
        seconds = statistics.median(times[f"{i}"])
        speed = batch_size / seconds
        achieved = run.train_flops * speed / 1e12
        if peak and achieved > peak:
            warnings.warn(f"{run.name} ran at {achieved:.3g} TFLOP/s, above the peak of {peak:g} TFLOP/s the MFU is "
                          "taken against: is --peak-tflops this device's?", stacklevel=2)
        results.append(ModelBenchResult(
            run.name, batch_size, steps, seconds, speed, count_parameters(run.model), str(dev),
            str(dtype).removeprefix("torch.") if dtype else None, run.train_flops, achieved, peak,
            achieved / peak if peak else None, compile, median_ratio(times["0"], times[f"{i}"])))
    return results


class _TrainStep:
    """One model with its optimizer and a fixed random batch; calling it runs one training step."""

    def __init__(self, name: str, batch_size: int, dev: torch.device, dtype: torch.dtype | None,
                 compile: bool, overrides: dict) -> None:
        torch.manual_seed(0)
        self.name = name
        require_preset_kind(name, "vision", "widenet bench model")
        self.model = create_model(name, **overrides).to(dev).train()
        cfg = self.model.cfg
        shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if dev.type == "cpu":
            tokens = cfg.num_patches + (cfg.pool == "token")
            check_activations_fit(batch_size, tokens, cfg.encoder, f"the activations of {name} for a batch of "
                                  f"{batch_size} images of {cfg.image_size} px ({tokens} tokens each)", dtype)
        self.train_flops = 3 * flops_per_image(self.model, shape)
        self.images = torch.randn(batch_size, *shape, device=dev)
        self.labels = torch.randint(0, cfg.num_classes, (batch_size,), device=dev)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.forward: Callable = compile_model(self.model) if compile else self.model
        self.dev, self.dtype = dev, dtype

    def __call__(self) -> None:
        with autocast(self.dev, self.dtype):
            out = self.forward(self.images)
            loss = F.cross_entropy(out.logits.float(), self.labels) + 0.01 * out.aux_loss
        apply_update(self.forward, self.opt, loss)
