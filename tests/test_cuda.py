"""The GPU fast path. Skipped without CUDA (CI has none); scripts/gpu-check.sh runs it on a GPU.

bf16 autocast with the router in float32, fused attention, and the grouped
expert matmuls chosen by the "auto" backend, each compared with the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from widenet.layers.moe import MoE, grouped_mm_works
from widenet.models.registry import create_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _moe_pair(backend: str, dim: int = 64, hidden: int = 128):
    torch.manual_seed(0)
    cpu = MoE(dim, hidden, 4, 2, noise_std=0.0, dropless=True)
    gpu = copy.deepcopy(cpu).to(CUDA)
    gpu.experts.backend = backend
    return cpu, gpu


@pytest.mark.parametrize("backend", ["loop", "grouped", "auto"])
def test_moe_on_cuda_matches_cpu_in_float32(backend):
    if backend == "grouped" and not grouped_mm_works(CUDA, torch.float32, 64, 128):
        pytest.skip("torch._grouped_mm does not take float32 on this GPU")
    cpu, gpu = _moe_pair(backend)
    x = torch.randn(300, 64)
    out_c, out_g = cpu(x), gpu(x.to(CUDA))
    torch.testing.assert_close(out_g.output.cpu(), out_c.output, rtol=1e-4, atol=1e-4)
    (out_c.output.square().sum() + out_c.aux_loss).backward()
    (out_g.output.square().sum() + out_g.aux_loss).backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-3, msg=name)


def test_auto_backend_picks_grouped_matmuls_under_bf16_where_they_work():
    cpu, gpu = _moe_pair("auto")
    works = grouped_mm_works(CUDA, torch.bfloat16, 64, 128)
    assert gpu.experts._use_grouped(CUDA, torch.bfloat16) == works
    x = torch.randn(300, 64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(x.to(CUDA))
    assert out.output.dtype == torch.bfloat16
    torch.testing.assert_close(out.output.float().cpu(), cpu(x).output, rtol=0.05, atol=0.05)
    print(f"grouped matmuls under bf16 on {torch.cuda.get_device_name()}: {works}")


def test_router_stays_float32_under_bf16_autocast():
    _, gpu = _moe_pair("auto")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        route = gpu.router(torch.randn(10, 64, device=CUDA, dtype=torch.bfloat16))
    assert route.logits.dtype == route.probs.dtype == torch.float32


def test_widenet_training_step_on_cuda_with_bf16_follows_cpu():
    torch.manual_seed(0)
    cpu = create_model("widenet_tiny", noise_std=0.0, dropless=True)
    gpu = copy.deepcopy(cpu).to(CUDA)
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    loss_c = F.cross_entropy(cpu(images).logits, labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(images.to(CUDA))
        loss_g = F.cross_entropy(out.logits.float(), labels.to(CUDA))
    loss_g.backward()
    assert loss_g.item() == pytest.approx(loss_c.item(), rel=0.05)
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


def test_fused_attention_kernel_runs_on_cuda():
    """SDPA picks a fused kernel (flash or memory-efficient) for the models' shapes under bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = create_model("vit_tiny").to(CUDA)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):  # no math fallback
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(torch.randn(4, 1, 28, 28, device=CUDA)).logits.sum().backward()
