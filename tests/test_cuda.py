"""The GPU fast path. Skipped without CUDA (CI has none); scripts/gpu-check.sh runs it on a GPU.

bf16 autocast with the router in float32, fused attention, the expert kernels
(the per-expert loop, grouped matmuls, padded buffers) against the CPU, and a
capacity-mode training step that never waits for the device; an evaluation waits at its end only.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from widenet.layers.experts import grouped_mm_works
from widenet.layers.moe import MoE
from widenet.models.registry import create_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _moe_pair(backend: str, dim: int = 64, hidden: int = 128, **kw):
    torch.manual_seed(0)
    cpu = MoE(dim, hidden, 4, 2, noise_std=0.0, **kw)
    gpu = copy.deepcopy(cpu).to(CUDA)
    gpu.experts.backend = backend
    return cpu, gpu


@pytest.mark.parametrize("backend", ["loop", "padded", "auto"])
@pytest.mark.parametrize("dropless", [False, True])
def test_moe_on_cuda_matches_cpu_in_float32(backend, dropless):
    cpu, gpu = _moe_pair(backend, dropless=dropless, capacity_factor=0.8)
    x = torch.randn(300, 64)
    out_c, out_g = cpu(x), gpu(x.to(CUDA))
    torch.testing.assert_close(out_g.output.cpu(), out_c.output, rtol=1e-4, atol=1e-4)
    (out_c.output.square().sum() + out_c.aux_loss).backward()
    (out_g.output.square().sum() + out_g.aux_loss).backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-3, msg=name)


def test_grouped_kernels_under_bf16_follow_the_loop():
    """Forward and backward of the grouped kernel against the loop kernel, both in bf16 on the GPU."""
    if not grouped_mm_works(CUDA, torch.bfloat16, 64, 128):
        pytest.skip("torch._grouped_mm does not run bf16 here (see the logged probe decision)")
    _, loop = _moe_pair("loop", capacity_factor=0.8)
    grouped = copy.deepcopy(loop)
    grouped.experts.backend = "grouped"
    x = torch.randn(300, 64, device=CUDA)
    results = []
    for m in (loop, grouped):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        assert out.output.dtype == torch.bfloat16
        (out.output.float().square().sum() + out.aux_loss).backward()
        results.append([out.output.float()] + [p.grad.float() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)


def test_auto_backend_under_bf16_takes_grouped_matmuls_where_they_are_sync_free():
    _, gpu = _moe_pair("auto")
    works = grouped_mm_works(CUDA, torch.bfloat16, 64, 128)
    sync_free = torch.cuda.get_device_capability()[0] in (9, 10)
    assert (gpu.experts.kernel(CUDA, torch.bfloat16) == "grouped") == (works and sync_free)
    print(f"grouped matmuls under bf16 on {torch.cuda.get_device_name()}: works {works}, sync-free {sync_free}")


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


@pytest.mark.parametrize("amp", [torch.bfloat16, None], ids=["bf16", "float32"])
def test_capacity_mode_training_step_never_waits_for_the_gpu(amp):
    """A whole training step (forward, loss, backward, AdamW) of widenet_b16 in capacity mode
    under torch.cuda.set_sync_debug_mode("error"): any host synchronisation raises."""
    torch.manual_seed(0)
    model = create_model("widenet_b16", image_size=64, num_classes=10).to(CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(8, 3, 64, 64, device=CUDA)
    labels = torch.randint(0, 10, (8,), device=CUDA)

    def step():
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            out = model(images)
            loss = F.cross_entropy(out.logits.float(), labels) + 0.01 * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # the first call probes the grouped kernels (which waits for the device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_evaluation_waits_for_the_gpu_as_often_for_four_batches_as_for_one():
    """Evaluation sums its loss, correct count and routing on the device and reads them at the end
    (it read every block's drop shares of every batch: 3 waits per block per batch)."""
    import warnings

    from widenet.train.evaluate import evaluation_sums

    torch.manual_seed(0)
    model = create_model("widenet_tiny").to(CUDA)
    images = torch.randint(0, 256, (4, 8, 1, 28, 28), dtype=torch.uint8, device=CUDA)
    labels = torch.randint(0, 10, (4, 8), device=CUDA)

    def waits(batches: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                evaluation_sums(model, zip(images[:batches], labels[:batches]), CUDA, [0.5], [0.25]).result()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)

    waits(1)  # the first call probes the grouped kernels (which waits for the device)
    assert waits(4) == waits(1)


def test_fused_attention_kernel_runs_on_cuda():
    """SDPA picks a fused kernel (flash or memory-efficient) for the models' shapes under bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = create_model("vit_tiny").to(CUDA)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):  # no math fallback
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(torch.randn(4, 1, 28, 28, device=CUDA)).logits.sum().backward()


def test_compiled_widenet_on_cuda_matches_eager():
    torch.manual_seed(0)
    model = create_model("widenet_tiny", noise_std=0.0).to(CUDA)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 1, 28, 28, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, ref = compiled(x), model(x)
    torch.testing.assert_close(out.logits.float(), ref.logits.float(), rtol=0.05, atol=0.05)
