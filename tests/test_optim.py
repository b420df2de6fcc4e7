"""Tests for widenet.train.optim (LAMB, parameter groups, schedules) and widenet.distributed.clip."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from widenet.distributed.clip import clip_grad_norm
from widenet.train.optim import (
    Lamb,
    build_optimizer,
    build_schedule,
    param_groups,
)

# ------------------------------------------------------------------- LAMB


def _reference_lamb(w, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-6, trust=True):
    """LAMB written out step by step with plain tensor math (float64)."""
    w = w.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        u = m_hat / (torch.sqrt(v_hat) + eps) + wd * w
        w_norm = math.sqrt(float((w * w).sum()))
        u_norm = math.sqrt(float((u * u).sum()))
        r = w_norm / u_norm if (trust and w_norm > 0 and u_norm > 0) else 1.0
        w = w - lr * r * u
    return w


def _run_lamb(w0, grads, **kwargs):
    p = nn.Parameter(w0.clone())
    opt = Lamb([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


W0 = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.5]], dtype=torch.float64)
G1 = torch.tensor([[0.5, 1.0, -0.2], [0.1, -0.3, 0.7]], dtype=torch.float64)
G2 = torch.tensor([[-0.4, 0.2, 0.9], [0.3, 0.3, -0.1]], dtype=torch.float64)


@pytest.mark.parametrize("n_steps", [1, 2])
def test_lamb_matches_hand_computation(n_steps):
    grads = [G1, G2][:n_steps]
    got = _run_lamb(W0, grads, lr=0.1, weight_decay=0.01)
    want = _reference_lamb(W0, grads, lr=0.1, wd=0.01)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.equal(got, W0)


def test_lamb_first_step_closed_form():
    # At t=1: m_hat = g, v_hat = g^2, so u = g / (|g| + eps) + wd * w.
    lr, wd, eps = 0.1, 0.01, 1e-6
    u = G1 / (G1.abs() + eps) + wd * W0
    r = W0.norm() / u.norm()
    got = _run_lamb(W0, [G1], lr=lr, weight_decay=wd, eps=eps)
    torch.testing.assert_close(got, W0 - lr * r * u, rtol=1e-12, atol=1e-12)


def test_lamb_trust_ratio_is_one_for_zero_weights():
    w0 = torch.zeros(2, 3, dtype=torch.float64)
    got = _run_lamb(w0, [G1], lr=0.1, weight_decay=0.01)
    u = G1 / (G1.abs() + 1e-6)  # w = 0, so no decay term either
    torch.testing.assert_close(got, -0.1 * u, rtol=1e-12, atol=1e-12)


def test_lamb_zero_update_leaves_weights_finite_and_unchanged():
    got = _run_lamb(W0, [torch.zeros_like(W0)], lr=0.1, weight_decay=0.0)
    assert torch.equal(got, W0)


def test_lamb_group_without_trust_ratio_is_adamw_like():
    got = _run_lamb(W0, [G1], lr=0.1, weight_decay=0.01, trust_ratio=False)
    want = _reference_lamb(W0, [G1], lr=0.1, wd=0.01, trust=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_lamb_no_decay_group_gets_no_weight_decay_or_trust_ratio():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    gw, gb = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    opt = build_optimizer("lamb", model, lr=0.1, weight_decay=0.5)
    model.weight.grad, model.bias.grad = gw.clone(), gb.clone()
    opt.step()
    # bias: plain bias-corrected Adam direction, no decay, r = 1
    torch.testing.assert_close(model.bias.detach(), b0 - 0.1 * gb / (gb.abs() + 1e-6))
    torch.testing.assert_close(model.weight.detach(), _reference_lamb(w0, [gw], lr=0.1, wd=0.5))


def test_lamb_reduces_quadratic_loss():
    torch.manual_seed(0)
    target = torch.randn(8, 8)
    w = nn.Parameter(torch.randn(8, 8))
    opt = Lamb([w], lr=0.02, weight_decay=0.0)

    def loss_fn():
        return ((w - target) ** 2).sum()

    first = loss_fn().item()
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.01 * first


def test_lamb_rejects_sparse_gradients():
    emb = nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = Lamb(emb.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_lamb_state_dict_round_trip():
    p = nn.Parameter(W0.clone())
    opt = Lamb([p], lr=0.1, weight_decay=0.01)
    p.grad = G1.clone()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    q = nn.Parameter(p.detach().clone())
    opt2 = Lamb([q], lr=0.1, weight_decay=0.01)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    p.grad, q.grad = G2.clone(), G2.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


def test_lamb_rejects_bad_hyperparameters():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr"):
        Lamb(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        Lamb(p, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="weight_decay"):
        Lamb(p, weight_decay=-0.1)


# --------------------------------------------------------------- param groups


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        shared = nn.Linear(4, 4)
        self.block_a = shared
        self.block_b = shared  # same module object reached through two paths
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_split_and_dedup():
    model = _Toy()
    groups = param_groups(model, weight_decay=0.05)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and decay["trust_ratio"] is True
    assert no_decay["weight_decay"] == 0.0 and no_decay["trust_ratio"] is False

    ids = lambda ps: [id(p) for p in ps]  # noqa: E731
    assert ids(decay["params"]) == ids([model.block_a.weight, model.head.weight])
    assert set(ids(no_decay["params"])) == set(
        ids(
            [
                model.embed.weight,
                model.cls_token,
                model.pos_embed,
                model.block_a.bias,
                model.norm.weight,
                model.norm.bias,
                model.head.bias,
            ]
        )
    )
    everything = ids(decay["params"]) + ids(no_decay["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(everything) == len(set(everything)) == len(trainable)
    assert set(everything) == trainable


def test_param_groups_name_suffixes_and_empty_groups():
    model = nn.Module()
    model.position_embeddings = nn.Parameter(torch.zeros(6, 4))
    model.token_type_embeddings = nn.Parameter(torch.zeros(2, 4))
    model.decoder_pos_embed = nn.Parameter(torch.zeros(6, 4))
    groups = param_groups(model, weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) == 3
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, weight_decay=-1.0)


def test_param_groups_tied_weights_appear_once():
    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    model.head = nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight
    groups = param_groups(model, weight_decay=0.1)
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == 1 and all_params[0] is model.embed.weight


def test_build_optimizer_adamw_and_lamb():
    model = _Toy()
    adamw = build_optimizer("AdamW", model, lr=1e-3, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    assert all("trust_ratio" not in g for g in adamw.param_groups)
    assert adamw.param_groups[0]["eps"] == 1e-8
    lamb = build_optimizer("lamb", model, lr=1e-3, weight_decay=0.05, betas=(0.8, 0.99))
    assert isinstance(lamb, Lamb)
    assert [g["trust_ratio"] for g in lamb.param_groups] == [True, False]
    assert lamb.param_groups[0]["betas"] == (0.8, 0.99) and lamb.param_groups[0]["eps"] == 1e-6


def test_build_optimizer_validation():
    model = _Toy()
    with pytest.raises(ValueError, match="adamw, lamb"):
        build_optimizer("sgd", model, lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="lr"):
        build_optimizer("lamb", model, lr=0.0, weight_decay=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        build_optimizer("lamb", model, lr=1e-3, weight_decay=-0.1)


# ------------------------------------------------------------------ schedules


def _lrs(decay, warmup, total, n, min_lr_ratio=0.0):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_schedule(opt, warmup, total, decay=decay, min_lr_ratio=min_lr_ratio)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_schedule_values():
    lrs = _lrs("linear", warmup=4, total=10, n=13)
    want = [0.5, 1.0, 1.5, 2.0] + [2.0 * (1 - (s - 4) / 6) for s in range(4, 11)] + [0.0, 0.0]
    assert lrs == pytest.approx(want, abs=1e-12)
    assert lrs[0] > 0


def test_cosine_schedule_values_with_floor():
    lrs = _lrs("cosine", warmup=2, total=6, n=8, min_lr_ratio=0.1)
    assert lrs[:3] == pytest.approx([1.0, 2.0, 2.0])
    assert lrs[4] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway: p = 0.5
    assert lrs[3] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert lrs[6:] == pytest.approx([0.2, 0.2])


def test_constant_and_no_warmup_schedules():
    assert _lrs("constant", warmup=3, total=5, n=7) == pytest.approx(
        [2 / 3, 4 / 3, 2.0, 2.0, 2.0, 2.0, 2.0]
    )
    assert _lrs("linear", warmup=0, total=4, n=5) == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    assert _lrs("linear", warmup=3, total=3, n=4) == pytest.approx([2 / 3, 4 / 3, 2.0, 0.0])


def test_schedule_state_dict_round_trip():
    def make():
        torch.manual_seed(0)
        model = nn.Linear(3, 3)
        opt = build_optimizer("lamb", model, lr=0.5, weight_decay=0.01)
        return model, opt, build_schedule(opt, 3, 12, decay="cosine", min_lr_ratio=0.05)

    model, opt, sched = make()
    for _ in range(5):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model2, opt2, sched2 = make()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for _ in range(8):
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
        assert sched2.get_last_lr() == sched.get_last_lr()
        for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
            o.zero_grad()
            m(torch.ones(1, 3)).sum().backward()
            o.step()
            s.step()
    assert torch.equal(model.weight, model2.weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(warmup_steps=0, total_steps=0), "total_steps"),
        (dict(warmup_steps=-1, total_steps=10), "warmup_steps"),
        (dict(warmup_steps=11, total_steps=10), "warmup_steps"),
        (dict(warmup_steps=1, total_steps=10, decay="step"), "linear, cosine, constant"),
        (dict(warmup_steps=1, total_steps=10, min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(warmup_steps=1.5, total_steps=10), "warmup_steps"),
    ],
)
def test_schedule_validation(kwargs, match):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        build_schedule(opt, **kwargs)


# ------------------------------------------------------------------- clipping


def test_clip_grad_norm_returns_pre_clip_norm():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    assert float(clip_grad_norm([a, b], None)) == pytest.approx(5.0)
    assert float(clip_grad_norm([a, b], 0)) == pytest.approx(5.0)
    assert a.grad.item() == 3.0  # not clipped
    norm = clip_grad_norm(iter([a, b]), 1.0)
    assert isinstance(norm, torch.Tensor) and norm.ndim == 0 and float(norm) == pytest.approx(5.0)  # no sync
    assert torch.cat([a.grad, b.grad]).norm().item() == pytest.approx(1.0, rel=1e-4)


def test_clip_grad_norm_without_grads_and_bad_max():
    p = nn.Parameter(torch.zeros(2))
    assert float(clip_grad_norm([p], 1.0)) == 0.0
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([p], -1.0)


def test_float16_updates_scale_the_loss_so_small_gradients_survive():
    """Under float16 autocast a small loss's gradients underflow to zero (1e-5 x the cross entropy of
    widenet_tiny: all of them); with the loss scale the update is the float32 gradient's, to float16
    precision. SGD with lr 1e4: the step taken is -1e4 x the gradient (large enough to read in float32)."""
    from widenet import create_model
    from widenet.train.update import apply_update, loss_scaler

    torch.manual_seed(0)
    model = create_model("widenet_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=4).eval()  # no noise
    nn.init.normal_(model.head.weight, std=0.02)  # (zero at init: no gradient would pass it)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 4, (8,))

    def loss_of(net, half: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            return 1e-5 * nn.functional.cross_entropy(net(x).logits.float(), y)

    loss_of(model, False).backward()
    oracle = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss_of(model, True).backward()
    plain = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n in oracle])
    want = torch.cat([g.flatten() for g in oracle.values()])
    assert (plain == 0).float().mean() > 0.8 and (want == 0).float().mean() < 0.1  # the failure: most lost
    assert loss_scaler(None, torch.device("cpu")) is None and loss_scaler(torch.bfloat16, torch.device("cpu")) is None
    scaler = loss_scaler(torch.float16, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_update(model, torch.optim.SGD(model.parameters(), lr=1e4), loss_of(model, True), scaler=scaler)
    step = torch.cat([(before[n] - p.detach()).flatten() for n, p in model.named_parameters() if n in oracle]) / 1e4
    assert (step - want).norm() < 0.01 * want.norm()


def test_float16_is_refused_where_processes_hold_different_gradients():
    """Under --fsdp or --expert-parallel each process holds other gradients, so their overflow checks
    could disagree and skip a step on some processes only."""
    from types import SimpleNamespace

    from widenet.train.update import loss_scaler

    for mode in ("fsdp", "expert"):
        with pytest.raises(ValueError, match=rf"float16 autocast \(--amp fp16, or --amp auto on a GPU without "
                                             rf"bfloat16\) needs a loss scale.* not under {mode} parallelism"):
            loss_scaler(torch.float16, torch.device("cpu"), SimpleNamespace(mode=mode))
    assert loss_scaler(torch.float16, torch.device("cpu"), SimpleNamespace(mode="ddp")) is not None
    assert loss_scaler(torch.bfloat16, torch.device("cpu"), SimpleNamespace(mode="fsdp")) is None


def test_float16_gradients_are_clipped_after_unscaling():
    """Global-norm clipping must see the true gradients, not the scaled ones (65536x larger): the
    step of a clipped float16 update has the clip's norm, as the float32 update's has."""
    import copy

    from widenet import create_model
    from widenet.distributed.parallel import ParallelContext
    from widenet.train.update import apply_update, loss_scaler

    torch.manual_seed(0)
    model = create_model("widenet_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=4).eval()
    nn.init.normal_(model.head.weight, std=0.02)
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 4, (8,))
    parallel, clip = ParallelContext.for_run(8, 0), 0.01
    steps = []
    for net, half in ((model, False), (twin, True)):
        before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            loss = nn.functional.cross_entropy(net(x).logits.float(), y)
        apply_update(net, torch.optim.SGD(net.parameters(), lr=1.0), loss, parallel, clip,
                     scaler=loss_scaler(torch.float16 if half else None, torch.device("cpu")))
        steps.append(before - torch.cat([p.detach().flatten() for p in net.parameters()]))
    full, half = steps
    assert full.norm() == pytest.approx(clip, rel=1e-3) and half.norm() == pytest.approx(clip, rel=1e-3)
    assert torch.nn.functional.cosine_similarity(full, half, dim=0) > 0.99
