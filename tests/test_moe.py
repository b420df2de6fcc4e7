"""MoE layer against the spec and the independent einsum oracle (tests/moe_oracle.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch

import widenet
from widenet.layers import dispatch
from widenet.layers import expert_loop
from widenet.layers.moe import MoE, MoEConfig, expert_capacity, load_balancing_loss, router_z_loss

if str(Path(__file__).resolve().parent) not in sys.path:  # the oracle lives next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_oracle import (
    dispatch_tensor,
    einsum_moe,
    kept_assignments,
    oracle_balance_loss,
    oracle_capacity,
    oracle_z_loss,
)

F64 = {"rtol": 1e-6, "atol": 1e-7}


@contextlib.contextmanager
def kernels_used() -> Iterator[list[str]]:
    """The expert kernels the MoE calls inside the block ran, one entry per call (the row layout
    each call asks for): a test comparing kernels must know that the kernel it names ran."""
    used: list[str] = []
    real = dispatch.row_layout

    def spy(kernel: str, *args, **kw):
        used.append(kernel)
        return real(kernel, *args, **kw)

    with mock.patch.object(dispatch, "row_layout", spy):
        yield used


def _moe(dim=6, hidden=10, experts=4, top_k=2, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    kw.setdefault("noise_std", 0.0)
    moe = MoE(dim, hidden, experts, top_k=top_k, **kw).to(dtype)
    # Non-zero biases so that they matter in every comparison.
    with torch.no_grad():
        moe.experts.b1.normal_(std=0.3)
        moe.experts.b2.normal_(std=0.3)
    return moe


def _params(moe):
    return [moe.router.weight, moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2]


def _oracle_copy(moe):
    return [p.detach().clone().requires_grad_(True) for p in _params(moe)]


def _run_both(moe, x, capacity, grad_seed=1, aux_weight=0.3):
    """Run library and oracle on the same weights; return outputs and gradients of both."""
    xl = x.detach().clone().requires_grad_(True)
    res = moe(xl)
    g = torch.randn(res.output.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(grad_seed))
    moe.zero_grad()
    ((res.output * g).sum() + aux_weight * res.aux_loss).backward()
    lib_grads = [xl.grad] + [p.grad for p in _params(moe)]

    xo = x.detach().clone().requires_grad_(True)
    wr, w1, b1, w2, b2 = _oracle_copy(moe)
    out, probs, index = einsum_moe(xo, wr, w1, b1, w2, b2, moe.top_k, capacity,
                                   renormalize=moe.router.renormalize)
    e = wr.shape[0]
    counts = torch.bincount(index.reshape(-1), minlength=e).to(probs.dtype)
    aux = e * torch.sum(counts / index.numel() * probs.mean(0))  # spec formula, differentiable
    ((out * g).sum() + aux_weight * aux).backward()
    oracle_grads = [xo.grad, wr.grad, w1.grad, b1.grad, w2.grad, b2.grad]
    return res, (out, probs, index, aux), lib_grads, oracle_grads


def _assert_grads_close(lib, ref, **tol):
    names = ["x", "router.weight", "w1", "b1", "w2", "b2"]
    for name, a, b in zip(names, lib, ref):
        assert a is not None, f"no gradient for {name}"
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"gradient of {n}: {m}")


def _skewed_x(n, dim, seed=2, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen, dtype=torch.float64) * scale


# ----------------------------------------------------------------------------
# Oracle equivalence
# ----------------------------------------------------------------------------
CASES = [
    # (experts, top_k, capacity_factor, dropless, renormalize, tokens)
    pytest.param(4, 1, 0.5, False, False, 24, id="top1-drop"),
    pytest.param(4, 1, 4.0, False, False, 24, id="top1-nodrop"),
    pytest.param(4, 1, 1.0, True, False, 24, id="top1-dropless"),
    pytest.param(4, 2, 0.5, False, False, 24, id="top2-drop"),
    pytest.param(4, 2, 0.5, False, True, 24, id="top2-drop-renorm"),
    pytest.param(4, 2, 1.2, False, False, 24, id="top2-paper-capacity"),
    pytest.param(4, 2, 4.0, False, True, 24, id="top2-nodrop-renorm"),
    pytest.param(4, 2, 1.0, True, False, 24, id="top2-dropless"),
    pytest.param(5, 3, 0.5, False, False, 20, id="top3-drop"),
    pytest.param(5, 3, 0.5, False, True, 20, id="top3-drop-renorm"),
    pytest.param(5, 3, 1.0, True, True, 20, id="top3-dropless-renorm"),
    pytest.param(3, 3, 1.0, False, False, 9, id="top3-of-3"),
    pytest.param(4, 2, 1.2, False, False, 1, id="one-token"),
    pytest.param(4, 1, 0.1, False, True, 1, id="one-token-top1-renorm"),
    pytest.param(1, 1, 1.2, False, False, 10, id="one-expert"),
    pytest.param(1, 1, 0.5, False, False, 10, id="one-expert-drop"),
    pytest.param(8, 2, 0.25, False, False, 32, id="e8-heavy-drop"),
]


@pytest.mark.parametrize("experts,top_k,factor,dropless,renorm,tokens", CASES)
def test_matches_einsum_oracle(experts, top_k, factor, dropless, renorm, tokens):
    moe = _moe(experts=experts, top_k=top_k, capacity_factor=factor, dropless=dropless,
               renormalize=renorm)
    # A router that prefers some experts makes drops likely at small factors.
    with torch.no_grad():
        moe.router.weight.mul_(3.0)
        moe.router.weight[0] += 0.5
    x = _skewed_x(tokens, moe.dim)
    capacity = tokens if dropless else oracle_capacity(tokens, experts, top_k, factor)
    assert moe.capacity(tokens) == capacity
    res, (out, probs, index, aux), lib_g, ref_g = _run_both(moe, x, capacity)

    assert res.output.dtype == torch.float64
    torch.testing.assert_close(res.output, out, **F64)
    torch.testing.assert_close(res.aux_loss.double(), aux.double(), rtol=1e-6, atol=1e-7)
    assert res.stats.balance_loss.item() == pytest.approx(oracle_balance_loss(probs, index, experts), rel=1e-5)
    _assert_grads_close(lib_g, ref_g, **F64)

    # Stats against the oracle's dispatch tensor.
    kept = kept_assignments(dispatch_tensor(index, experts, capacity), index).double()  # (N, K) 1 = kept
    dropped_assign = 1.0 - kept.sum().item() / kept.numel()
    dropped_tokens = (kept.sum(1) == 0).double().mean().item()
    assert res.stats.dropped_assignment_fraction.item() == pytest.approx(dropped_assign, abs=1e-6)
    assert res.stats.dropped_fraction.item() == pytest.approx(dropped_tokens, abs=1e-6)
    frac = torch.bincount(index.reshape(-1), minlength=experts).double() / index.numel()
    torch.testing.assert_close(res.stats.expert_fraction.double(), frac)
    # The drop cases really drop (otherwise the parametrisation tests nothing).
    if dropless or factor >= 4.0 or experts == 1 and factor >= 1:
        assert dropped_assign == 0.0
    elif factor <= 0.5 and tokens > 1:
        assert dropped_assign > 0.0


def test_matches_oracle_float32():
    """The default dtype too (looser tolerance)."""
    moe = _moe(experts=4, top_k=2, capacity_factor=0.75, dtype=torch.float32)
    x = _skewed_x(30, moe.dim).float()
    res, (out, *_), lib_g, ref_g = _run_both(moe, x, oracle_capacity(30, 4, 2, 0.75))
    assert res.output.dtype == torch.float32
    torch.testing.assert_close(res.output, out, rtol=1e-5, atol=1e-5)
    _assert_grads_close(lib_g, ref_g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_expert_without_tokens(top_k):
    """An expert nobody chooses: zero fraction, zero gradient, and still equal to the oracle."""
    moe = _moe(experts=4, top_k=top_k, capacity_factor=1.0)
    x = _skewed_x(16, moe.dim)
    x[:, 0] = x[:, 0].abs() + 1.0  # feature 0 is always >= 1
    with torch.no_grad():
        moe.router.weight[3] = 0.0
        moe.router.weight[3, 0] = -20.0  # expert 3 logit <= -20: never in the top-k
    res, (out, _probs, index, _), lib_g, ref_g = _run_both(moe, x, oracle_capacity(16, 4, top_k, 1.0))
    assert not (index == 3).any()
    assert res.stats.expert_fraction[3].item() == 0.0
    torch.testing.assert_close(res.output, out, **F64)
    _assert_grads_close(lib_g, ref_g, **F64)
    for name, g in zip(["w1", "b1", "w2", "b2"], lib_g[2:]):
        assert torch.count_nonzero(g[3]) == 0, f"{name} of the unused expert got a gradient"
        assert torch.count_nonzero(g[:3]) > 0


def test_eval_mode_equals_oracle_with_eval_capacity():
    """eval_capacity_factor is used in eval mode, capacity_factor in training; default noise off in eval."""
    moe = _moe(experts=4, top_k=2, capacity_factor=0.5, eval_capacity_factor=2.0, noise_std=None)
    with torch.no_grad():
        moe.router.weight.mul_(3.0)
    x = _skewed_x(20, moe.dim)
    moe.eval()
    assert moe.capacity(20) == math.ceil(2.0 * 2 * 20 / 4)
    res, (out, *_), lib_g, ref_g = _run_both(moe, x, oracle_capacity(20, 4, 2, 2.0))
    torch.testing.assert_close(res.output, out, **F64)
    _assert_grads_close(lib_g, ref_g, **F64)
    moe.train()
    assert moe.capacity(20) == math.ceil(0.5 * 2 * 20 / 4)
    moe.router.noise_std = 0.0
    res, (out, *_), lib_g, ref_g = _run_both(moe, x, oracle_capacity(20, 4, 2, 0.5))
    assert res.stats.dropped_assignment_fraction > 0
    torch.testing.assert_close(res.output, out, **F64)
    _assert_grads_close(lib_g, ref_g, **F64)


def test_eval_capacity_defaults_to_training_factor():
    moe = _moe(experts=4, top_k=2, capacity_factor=0.5).eval()
    assert moe.capacity(40) == 10


def test_dropless_skewed_router_equals_oracle_full_capacity():
    """Every token prefers expert 0: dropless keeps all, equal to the oracle at capacity N (no
    expert can get more than one assignment per token)."""
    moe = _moe(experts=4, top_k=2, capacity_factor=0.5, dropless=True)
    x = _skewed_x(24, moe.dim)
    x[:, 0] = x[:, 0].abs() + 1.0
    with torch.no_grad():
        moe.router.weight[0, 0] = 15.0  # expert 0 is everyone's first choice
    n = 24
    assert moe.capacity(n) == n
    res, (out, _probs, index, _), lib_g, ref_g = _run_both(moe, x, n)
    assert (index[:, 0] == 0).all()
    assert res.stats.dropped_assignment_fraction.item() == 0.0
    assert res.stats.dropped_fraction.item() == 0.0
    torch.testing.assert_close(res.output, out, **F64)
    _assert_grads_close(lib_g, ref_g, **F64)
    # The same router with capacity would drop: dropless is really doing something.
    moe.cfg = dataclasses.replace(moe.cfg, dropless=False)
    assert moe(x).stats.dropped_assignment_fraction.item() > 0.0


def test_one_expert_top1_is_a_dense_ffn():
    """E = 1, k = 1: combine weight 1, no drops, output = FFN(x) for every token."""
    moe = _moe(experts=1, top_k=1, capacity_factor=1.0)
    x = _skewed_x(7, moe.dim)
    out = moe(x).output
    w1, b1, w2, b2 = (p[0] for p in _params(moe)[1:])
    ref = torch.nn.functional.gelu(x @ w1 + b1) @ w2 + b2
    torch.testing.assert_close(out, ref, **F64)
    assert moe(x).aux_loss.item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------
# Capacity and priority with hand-built routing
# ----------------------------------------------------------------------------
# D = E = 4, router.weight = 10 * I, token t = 1.0 at its first expert, 0.5 at its second:
# logits 10 / 5 / 0 / 0, so the top-2 is (first, second) exactly as written here.
PREFS = [(0, 1), (0, 2), (1, 3), (0, 1), (1, 2), (2, 3)]


def _hand_moe(prefs, top_k=2, **kw):
    e = 4
    moe = _moe(dim=e, hidden=5, experts=e, top_k=top_k, **kw)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(e, dtype=torch.float64) * 10.0)
    x = torch.zeros(len(prefs), e, dtype=torch.float64)
    for t, (a, b) in enumerate(prefs):
        x[t, a] = 1.0
        x[t, b] = 0.5
    return moe, x


def _expert_ffn(moe, e, x):
    ex = moe.experts
    return torch.nn.functional.gelu(x @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]


def test_capacity_priority_hand_built():
    """Capacity 2 per expert (ceil(0.5*2*6/4)). Walk-through of the priority order:

    1st choices in token order: e0 <- t0, t1, (t3 dropped: full); e1 <- t2, t4; e2 <- t5.
    2nd choices in token order: t0->e1 dropped (full by the LATER tokens t2, t4's 1st
    choices); t1->e2 kept; t2->e3 kept; t3->e1 dropped; t4->e2 dropped (t1 was
    earlier); t5->e3 kept.  t3 lost both assignments -> exactly zero output.
    """
    moe, x = _hand_moe(PREFS, capacity_factor=0.5)
    assert moe.capacity(6) == 2
    res = moe(x)
    out = res.output
    probs = torch.softmax(x @ moe.router.weight.t(), -1)  # float64 input: float64 router
    kept = {0: [0], 1: [0, 1], 2: [0, 1], 3: [], 4: [0], 5: [0, 1]}  # token -> kept choice numbers
    with torch.no_grad():
        for t, (a, b) in enumerate(PREFS):
            ref = torch.zeros(4, dtype=torch.float64)
            for j in kept[t]:
                e = (a, b)[j]
                ref += probs[t, e] * _expert_ffn(moe, e, x[t])
            torch.testing.assert_close(out[t], ref, **F64)
    assert torch.equal(out[3], torch.zeros(4, dtype=torch.float64)), "fully dropped token must be exactly 0"
    assert (out[[0, 1, 2, 4, 5]].abs().sum(1) > 0).all()
    assert res.stats.dropped_fraction.item() == pytest.approx(1 / 6)
    assert res.stats.dropped_assignment_fraction.item() == pytest.approx(4 / 12)
    torch.testing.assert_close(res.stats.expert_fraction, torch.tensor([3, 4, 3, 2]) / 12.0)
    # m_i counts assignments BEFORE dropping.
    m = torch.tensor([3, 4, 3, 2], dtype=torch.float32) / 12
    assert res.aux_loss.item() == pytest.approx(4 * torch.sum(m * probs.float().mean(0)).item(), rel=1e-6)


def test_later_first_choice_beats_earlier_second_choice():
    """Capacity 1: t0's 2nd choice (e1) loses to t1's 1st choice (e1) although t0 comes first."""
    moe, x = _hand_moe([(0, 1), (1, 0)], capacity_factor=1.0)  # ceil(1*2*2/4) = 1
    assert moe.capacity(2) == 1
    res = moe(x)
    probs = torch.softmax(x @ moe.router.weight.t(), -1)  # float64 input: float64 router
    with torch.no_grad():
        torch.testing.assert_close(res.output[0], probs[0, 0] * _expert_ffn(moe, 0, x[0]), **F64)
        torch.testing.assert_close(res.output[1], probs[1, 1] * _expert_ffn(moe, 1, x[1]), **F64)
    assert res.stats.dropped_assignment_fraction.item() == pytest.approx(0.5)
    assert res.stats.dropped_fraction.item() == 0.0


def test_top1_overflow_tokens_are_exactly_zero():
    """Top-1, everyone to expert 0, capacity 2: tokens 2.. get exactly zero output."""
    moe, x = _hand_moe([(0, 1)] * 8, top_k=1, capacity_factor=1.0)  # ceil(1*1*8/4) = 2
    res = moe(x)
    assert torch.count_nonzero(res.output[2:]) == 0
    assert (res.output[:2].abs().sum(1) > 0).all()
    assert res.stats.dropped_fraction.item() == pytest.approx(6 / 8)
    assert res.stats.dropped_assignment_fraction.item() == pytest.approx(6 / 8)
    # Dropped tokens get no gradient either.
    xg = x.clone().requires_grad_(True)
    moe(xg).output.sum().backward()
    assert torch.count_nonzero(xg.grad[2:]) == 0


def test_padding_does_not_take_capacity():
    """Capacity counts non-padding tokens only; padding gets zero output and changes nothing."""
    moe, x = _hand_moe(PREFS, capacity_factor=0.5)
    ref = moe(x)
    # Padding tokens interleaved, all preferring expert 0 (would steal its slots if counted).
    pad_rows = torch.zeros(6, 4, dtype=torch.float64)
    pad_rows[:, 0] = 1.0
    xp = torch.empty(12, 4, dtype=torch.float64)
    mask = torch.zeros(12, dtype=torch.bool)
    xp[0::2], mask[0::2] = pad_rows, True
    xp[1::2] = x
    res = moe(xp, padding_mask=mask)
    assert torch.count_nonzero(res.output[mask]) == 0
    torch.testing.assert_close(res.output[~mask], ref.output, rtol=0, atol=0)
    # Losses are sums over all tokens with padding's terms zeroed (static shapes), so they may
    # differ from the unpadded call's in the last bit, not more.
    torch.testing.assert_close(res.aux_loss, ref.aux_loss, rtol=1e-14, atol=0)
    for f in ("expert_fraction", "dropped_fraction", "dropped_assignment_fraction", "balance_loss", "z_loss"):
        torch.testing.assert_close(getattr(res.stats, f), getattr(ref.stats, f), rtol=1e-14, atol=0)


def test_padding_3d_matches_unpadded_and_gets_no_gradient():
    moe = _moe(experts=4, top_k=2, capacity_factor=0.75, z_loss_weight=0.1)
    x = _skewed_x(2 * 7, moe.dim).view(2, 7, moe.dim)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 5:] = True
    mask[1, 3:] = True
    xg = x.clone().requires_grad_(True)
    res = moe(xg, padding_mask=mask)
    (res.output.sum() + res.aux_loss).backward()
    real = x[~mask]  # (8, D) in token order
    ref = moe(real)
    torch.testing.assert_close(res.output[~mask], ref.output, **F64)
    assert torch.count_nonzero(res.output[mask]) == 0
    torch.testing.assert_close(res.aux_loss, ref.aux_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res.stats.z_loss, ref.stats.z_loss, rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(xg.grad[mask]) == 0
    assert torch.count_nonzero(xg.grad[~mask]) > 0


def test_whatever_padding_holds_stays_out():
    """NaN or inf in padding rows (an empty buffer) used to reach the balance loss, the router's
    gradient and the padding rows' output (NaN * 0 is NaN): the call must equal one whose padding
    holds ordinary numbers."""
    moe = _moe(experts=4, top_k=2, capacity_factor=0.75, z_loss_weight=0.1).train()
    x = _skewed_x(10, moe.dim)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[7:] = True
    results = []
    for fill in (0.5, float("nan"), float("inf")):
        moe.zero_grad()
        xg = x.clone()
        xg[mask] = fill
        xg.requires_grad_(True)
        res = moe(xg, padding_mask=mask)
        (res.output.sum() + res.aux_loss).backward()
        results.append((res.output, res.aux_loss, xg.grad, moe.router.weight.grad.clone(), moe.experts.w1.grad.clone()))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want, **F64)
    assert torch.count_nonzero(results[1][0][mask]) == 0 and torch.count_nonzero(results[1][2][mask]) == 0


def test_settings_go_in_config_or_as_keywords_not_both():
    """MoE(..., top_k=1, config=MoEConfig(top_k=2)) built top-2 without a word."""
    with pytest.raises(TypeError, match=r"not both \(top_k\)"):
        MoE(6, 10, top_k=1, config=MoEConfig(top_k=2))
    with pytest.raises(TypeError, match=r"not both \(num_experts\)"):
        MoE(6, 10, 8, config=MoEConfig())
    with pytest.raises(TypeError, match="must be a MoEConfig or a dict of its settings, got int"):
        MoE(6, 10, config=3)
    assert MoE(6, 10, config=dict(num_experts=8, top_k=1)).router.weight.shape == (8, 6)
    assert (MoE(6, 10).num_experts, MoE(6, 10).top_k, MoE(6, 10, 8, 1).top_k) == (4, 2, 1)
    with pytest.raises(ValueError, match=r"expects token dimension 6, got input of shape \(\)"):
        MoE(6, 10)(torch.tensor(1.0))
    with pytest.raises(dataclasses.FrozenInstanceError):  # it would half apply (top_k is read at build time)
        MoE(6, 10).cfg.top_k = 1
    with pytest.raises(TypeError, match="MoE input is torch.float64 and its weights torch.float32"):
        MoE(6, 10)(torch.randn(3, 6, dtype=torch.float64))  # was computed in float32 without a word
    with torch.autocast("cpu", dtype=torch.bfloat16):  # where a mixed input is expected
        assert MoE(6, 10)(torch.randn(3, 6)).output.dtype == torch.bfloat16


def test_dropless_routing_makes_answers_independent_of_the_batch():
    """With capacity, an eval-mode token's output depends on its batch neighbours and their order;
    inside dropless_routing it does not, and the layer's settings are back afterwards."""
    moe = _moe(experts=4, top_k=2, capacity_factor=0.5).eval()
    x = _skewed_x(24, moe.dim)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    alone = torch.cat([moe(x[i:i + 1]).output for i in range(24)])  # one token per call: never dropped
    assert not torch.allclose(moe(x).output, alone)
    with widenet.dropless_routing(moe):
        torch.testing.assert_close(moe(x).output, alone, **F64)
        torch.testing.assert_close(moe(x[order]).output, alone[order], **F64)
    assert not moe.cfg.dropless and not torch.allclose(moe(x).output, alone)


def test_all_padding_gives_zero_output_and_loss():
    moe = _moe(experts=4, top_k=2)
    x = _skewed_x(5, moe.dim).requires_grad_(True)
    res = moe(x, padding_mask=torch.ones(5, dtype=torch.bool))
    assert torch.count_nonzero(res.output) == 0
    assert res.aux_loss.item() == 0.0
    (res.output.sum() + res.aux_loss).backward()  # must not fail


# ----------------------------------------------------------------------------
# Loss functions and capacity on hand-made numbers
# ----------------------------------------------------------------------------
def test_load_balancing_loss_hand_values():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    # top-1: experts 0, 1, 2, 0 -> m = [2/4, 1/4, 1/4]; P = [1.5/4, 1.4/4, 1.1/4]
    idx1 = torch.tensor([[0], [1], [2], [0]])
    expected = 3 * (0.5 * 0.375 + 0.25 * 0.35 + 0.25 * 0.275)
    assert load_balancing_loss(probs, idx1, 3).item() == pytest.approx(expected, rel=1e-6)
    # top-2: (0,1) (1,2) (2,0) (0,1) -> counts [3, 3, 2] / 8
    idx2 = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])
    expected = 3 * (3 / 8 * 0.375 + 3 / 8 * 0.35 + 2 / 8 * 0.275)
    assert load_balancing_loss(probs, idx2, 3).item() == pytest.approx(expected, rel=1e-6)
    assert load_balancing_loss(probs, idx2, 3).item() == pytest.approx(oracle_balance_loss(probs, idx2, 3), rel=1e-6)


@pytest.mark.parametrize("e,k", [(2, 1), (4, 2), (8, 2), (5, 3)])
def test_load_balancing_loss_uniform_and_collapsed(e, k):
    n = 10
    uniform = torch.full((n, e), 1.0 / e)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    assert load_balancing_loss(uniform, idx, e).item() == pytest.approx(1.0, abs=1e-6)
    # Collapsed: every token puts probability 1 on expert 0 and routes only there.
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 1.0
    idx0 = torch.zeros(n, 1, dtype=torch.long)
    assert load_balancing_loss(collapsed, idx0, e).item() == pytest.approx(e * 1.0 * 1.0)
    # Collapsed top-k: m_0 = 1/k, P_0 = 1 -> E / k.
    idxk = torch.stack([torch.arange(k)] * n)
    assert load_balancing_loss(collapsed, idxk, e).item() == pytest.approx(e / k)


def test_load_balancing_loss_random_matches_loop():
    gen = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(13, 6, generator=gen), -1)
    idx = probs.topk(2, dim=-1).indices
    assert load_balancing_loss(probs, idx, 6).item() == pytest.approx(oracle_balance_loss(probs, idx, 6), rel=1e-6)


def test_uniform_router_gives_balance_loss_one():
    moe = _moe(experts=4, top_k=2, dtype=torch.float32)
    with torch.no_grad():
        moe.router.weight.zero_()
    res = moe(torch.randn(9, moe.dim))
    assert res.aux_loss.item() == 1.0
    assert res.stats.balance_loss.item() == 1.0


@pytest.mark.parametrize("n,e,k,factor,expected", [
    (8, 4, 2, 1.0, 4), (10, 4, 1, 1.0, 3), (1, 4, 2, 1.2, 1), (100, 8, 2, 1.25, 32),
    (7, 1, 1, 1.0, 7), (6, 4, 2, 0.5, 2), (196, 4, 2, 1.2, 118), (3, 4, 1, 0.01, 1),
])
def test_expert_capacity_values(n, e, k, factor, expected):
    assert expert_capacity(n, e, k, factor) == expected


def test_router_z_loss_hand_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp = ln 2, ln 4
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2, rel=1e-6)
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(11, 5, generator=gen) * 4
    assert router_z_loss(big).item() == pytest.approx(oracle_z_loss(big), rel=1e-5)


def test_aux_loss_includes_weighted_z_loss():
    moe = _moe(experts=4, top_k=2, z_loss_weight=0.25, dtype=torch.float32)
    x = torch.randn(12, moe.dim)
    res = moe(x)
    logits = (x @ moe.router.weight.t()).detach()
    probs = torch.softmax(logits, -1)
    idx = probs.topk(2, -1).indices
    balance = oracle_balance_loss(probs, idx, 4)
    z = oracle_z_loss(logits)
    assert res.stats.z_loss.item() == pytest.approx(z, rel=1e-5)
    assert res.stats.balance_loss.item() == pytest.approx(balance, rel=1e-5)
    assert res.aux_loss.item() == pytest.approx(balance + 0.25 * z, rel=1e-5)


# ----------------------------------------------------------------------------
# Noise, autocast, shapes, stats, state
# ----------------------------------------------------------------------------
def _capture_logits(moe, x):
    seen = []
    # RouterOutput.logits is expert-major (E, N); compare token by token as (N, E).
    handle = moe.router.register_forward_hook(lambda mod, inp, out: seen.append(out.logits.t().detach().clone()))
    try:
        moe(x)
    finally:
        handle.remove()
    return seen[0]


def test_noise_default_std_is_one_over_e_in_training():
    moe = _moe(experts=4, top_k=2, noise_std=None, dtype=torch.float32).train()
    assert moe.router.noise_std == pytest.approx(0.25)
    x = torch.randn(4000, moe.dim)
    clean = (x @ moe.router.weight.t()).detach()
    a, b = _capture_logits(moe, x), _capture_logits(moe, x)
    assert not torch.equal(a, b), "training-mode routing must be noisy"
    assert (a - clean).std().item() == pytest.approx(0.25, rel=0.05)
    assert (a - clean).mean().abs().item() < 0.02


def test_noise_custom_std():
    moe = _moe(experts=8, top_k=2, noise_std=0.5, dtype=torch.float32).train()
    x = torch.randn(3000, moe.dim)
    clean = (x @ moe.router.weight.t()).detach()
    assert (_capture_logits(moe, x) - clean).std().item() == pytest.approx(0.5, rel=0.05)


def test_no_noise_in_eval_mode_and_with_zero_std():
    moe = _moe(experts=4, top_k=2, noise_std=None, dtype=torch.float32).eval()
    x = torch.randn(50, moe.dim)
    clean = (x @ moe.router.weight.t()).detach()
    torch.testing.assert_close(_capture_logits(moe, x), clean)
    r1, r2 = moe(x), moe(x)
    assert torch.equal(r1.output, r2.output)
    moe0 = _moe(experts=4, top_k=2, noise_std=0.0, dtype=torch.float32).train()
    assert torch.equal(_capture_logits(moe0, x), _capture_logits(moe0, x))
    assert torch.equal(moe0(x).output, moe0(x).output)


def test_noise_changes_outputs_in_training():
    moe = _moe(experts=4, top_k=2, noise_std=1.0, dtype=torch.float32).train()
    x = torch.randn(50, moe.dim)
    assert not torch.equal(moe(x).output, moe(x).output)


def test_router_float32_under_bf16_autocast():
    moe = _moe(experts=4, top_k=2, dtype=torch.float32)
    x = torch.randn(10, moe.dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = moe.router(x)
        direct_bf16 = moe.router(x.bfloat16())
        logits = _capture_logits(moe, x)
        res = moe(x)
    assert direct.logits.dtype == torch.float32
    assert direct.probs.dtype == torch.float32
    assert direct_bf16.logits.dtype == torch.float32
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, (x @ moe.router.weight.t()).detach(), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(res.output).all()
    torch.testing.assert_close(res.output.float(), moe(x).output, rtol=0.05, atol=0.05)


def test_3d_input_equals_flattened_2d():
    moe = _moe(experts=4, top_k=2, capacity_factor=0.6)
    x = _skewed_x(3 * 5, moe.dim).view(3, 5, moe.dim)
    r3, r2 = moe(x), moe(x.reshape(15, moe.dim))
    assert r3.output.shape == (3, 5, moe.dim)
    assert r3.stats.dropped_assignment_fraction > 0  # capacity is per call, over all B*T tokens
    torch.testing.assert_close(r3.output.reshape(15, moe.dim), r2.output, rtol=0, atol=0)
    torch.testing.assert_close(r3.aux_loss, r2.aux_loss, rtol=0, atol=0)
    torch.testing.assert_close(r3.stats.expert_fraction, r2.stats.expert_fraction, rtol=0, atol=0)


def test_stats_sum_to_one_and_are_detached():
    moe = _moe(experts=4, top_k=2, capacity_factor=0.5, z_loss_weight=0.1, dtype=torch.float32)
    res = moe(torch.randn(2, 9, moe.dim, requires_grad=True))
    st = res.stats
    assert st.expert_fraction.shape == (4,)
    assert st.expert_fraction.sum().item() == pytest.approx(1.0)
    for name in ("expert_fraction", "dropped_fraction", "dropped_assignment_fraction", "balance_loss", "z_loss"):
        t = getattr(st, name)
        assert isinstance(t, torch.Tensor)
        assert not t.requires_grad and t.grad_fn is None, f"{name} is not detached"
        assert torch.isfinite(t).all()
    assert 0.0 <= st.dropped_fraction.item() <= st.dropped_assignment_fraction.item() <= 1.0
    assert res.aux_loss.requires_grad and res.aux_loss.ndim == 0


def test_no_state_kept_between_calls():
    moe = _moe(experts=4, top_k=2, capacity_factor=0.6)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    x1 = _skewed_x(12, moe.dim, seed=10)
    x2 = _skewed_x(7, moe.dim, seed=11)
    alone = moe(x2)
    moe(x1)
    after_other = moe(x2)
    torch.testing.assert_close(after_other.output, alone.output, rtol=0, atol=0)
    torch.testing.assert_close(after_other.aux_loss, alone.aux_loss, rtol=0, atol=0)
    torch.testing.assert_close(after_other.stats.expert_fraction, alone.stats.expert_fraction, rtol=0, atol=0)
    assert list(moe.buffers()) == []
    for k, v in moe.state_dict().items():
        assert torch.equal(v, before[k])


def test_parameter_shapes_and_router_init():
    moe = MoE(12, 20, 5, top_k=3)
    assert moe.router.weight.shape == (5, 12)
    assert moe.router.weight.dtype == torch.float32
    assert moe.experts.w1.shape == (5, 12, 20)
    assert moe.experts.b1.shape == (5, 20)
    assert moe.experts.w2.shape == (5, 20, 12)
    assert moe.experts.b2.shape == (5, 12)
    names = {n for n, _ in moe.named_parameters()}
    assert names == {"router.weight", "experts.w1", "experts.b1", "experts.w2", "experts.b2"}
    # Experts are independent: different initial weights.
    assert not torch.equal(moe.experts.w1[0], moe.experts.w1[1])


@pytest.mark.parametrize("kwargs", [
    {"top_k": 5, "num_experts": 4},
    {"capacity_factor": 0.0},
    {"capacity_factor": -1.0},
    {"dim": 0},
    {"hidden_dim": 0},
    {"num_experts": 0, "top_k": 1},
    {"top_k": 0},
    {"dim": -3},
    {"eval_capacity_factor": 0.0},
    {"noise_std": -0.1},
    {"z_loss_weight": -1.0},
])
def test_constructor_errors(kwargs):
    args = {"dim": 8, "hidden_dim": 16, "num_experts": 4, "top_k": 2}
    args.update(kwargs)
    with pytest.raises(ValueError):
        MoE(**args)


def test_forward_errors():
    moe = MoE(8, 16, 4)
    with pytest.raises(ValueError):
        moe(torch.randn(5, 7))
    with pytest.raises(ValueError):
        moe(torch.randn(2, 5, 9))
    with pytest.raises(ValueError):
        moe(torch.randn(2, 5, 8), padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        moe(torch.randn(10, 8), padding_mask=torch.zeros(2, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------
# Mixed precision, exact capacity, integer masks
# ----------------------------------------------------------------------------
def test_bf16_input_under_autocast():
    """Experts compute in the autocast dtype; the result stays close to float32."""
    moe = _moe(experts=4, top_k=2, dtype=torch.float32)
    x = torch.randn(10, moe.dim)
    seen = []
    real = dispatch.RoutedExperts.forward

    def spy(ctx, x, *args):
        seen.append((x.dtype, args[5].dtype))  # the tokens and w1 (after weight, slot, inverse, row_expert, kept)
        return real(ctx, x, *args)

    with torch.autocast("cpu", dtype=torch.bfloat16), mock.patch.object(dispatch.RoutedExperts, "forward", spy):
        out = moe(x.bfloat16()).output
    assert seen == [(torch.bfloat16, torch.bfloat16)] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), moe(x).output, rtol=0.05, atol=0.05)


def test_expert_capacity_is_exact_for_decimal_factors():
    """1.1 * 100 / 2 is 55.00000000000001 in floating point; capacity must be 55."""
    assert expert_capacity(100, 2, 1, 1.1) == 55
    assert expert_capacity(100, 4, 2, 1.1) == 55
    assert expert_capacity(50, 2, 2, 1.1) == 50  # at most N: an expert gets one assignment per token at most
    assert expert_capacity(10, 4, 2, 1e30) == 10 and int(expert_capacity(torch.tensor(10), 4, 2, 1e30)) == 10
    for n in (0, 1, 10):  # ceil(1e-30 * 10 / 4) is 1: a factor that small rounded to no slot at all
        assert expert_capacity(n, 4, 1, 1e-30) == min(n, 1) == int(expert_capacity(torch.tensor(n), 4, 1, 1e-30))
    config = MoEConfig(capacity_factor=1.1, eval_capacity_factor=0.3)
    assert config.capacity_ratios == ((11, 10), (3, 10))
    del config.__dict__["capacity_ratios"]  # a config pickled before the ratios were kept
    assert pickle.loads(pickle.dumps(config)).capacity_ratios == ((11, 10), (3, 10))


def test_padding_masks_take_one_convention_and_the_other_by_name():
    """padding_mask is bool, True = padding; Hugging Face's attention_mask (1 = keep) goes in as keep_mask.
    An integer padding_mask is refused: a mask of ones would otherwise mean all padding (zeros out)."""
    moe = _moe(experts=4, top_k=2, dtype=torch.float64)
    x = torch.randn(10, moe.dim, dtype=torch.float64)
    padding = torch.tensor([False] * 5 + [True] * 5)
    want = moe(x, padding_mask=padding).output
    assert torch.all(want[5:] == 0) and torch.all(want[:5].abs().sum(-1) > 0)
    torch.testing.assert_close(moe(x, keep_mask=~padding).output, want)
    torch.testing.assert_close(moe(x, keep_mask=(~padding).long()).output, want)
    torch.testing.assert_close(moe(x, keep_mask=(~padding).float()).output, want)  # as Hugging Face takes it
    with pytest.raises(ValueError, match="only 0 .* and 1"):
        moe(x, keep_mask=torch.full((10,), 0.5))
    with pytest.raises(TypeError, match="padding_mask must be a bool tensor.*keep_mask"):
        moe(x, padding_mask=torch.ones(10, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        moe(x, padding_mask=padding, keep_mask=~padding)
    with pytest.raises(ValueError, match="only 0 .* and 1"):
        moe(x, keep_mask=torch.full((10,), 2))
    with pytest.raises(ValueError, match="keep_mask shape"):
        moe(x, keep_mask=torch.ones(9, dtype=torch.long))
    with pytest.raises(TypeError, match="padding_mask must be a torch.Tensor, got list"):
        moe(x, padding_mask=[False] * 10)


def test_tokens_that_are_not_floating_point_tensors_are_refused():
    """Token ids passed by mistake were cast to float and routed; a numpy array failed deep inside."""
    moe = _moe(experts=4, top_k=2, dtype=torch.float32)
    for bad, name in ((torch.ones(2, 5, moe.dim, dtype=torch.int64), "torch.int64"),
                      (torch.ones(2, moe.dim, dtype=torch.bool), "torch.bool"),
                      (torch.ones(2, moe.dim).numpy(), "ndarray")):
        with pytest.raises(TypeError, match=f"MoE expects a floating-point torch.Tensor of tokens, got {name}"):
            moe(bad)


def test_z_loss_statistic_reported_without_weight():
    moe = _moe(experts=4, top_k=2, dtype=torch.float64)
    x = torch.randn(10, moe.dim, dtype=torch.float64)
    out = moe(x)
    logits = x @ moe.router.weight.t()
    expected = torch.logsumexp(logits, dim=-1).pow(2).mean()
    torch.testing.assert_close(out.stats.z_loss, expected)
    torch.testing.assert_close(out.aux_loss, out.stats.balance_loss)  # weight 0: not in the loss


# ----------------------------------------------------------------------------
# Expert kernels (layers/experts.py): loop, grouped matmuls, padded batched matmuls
# ----------------------------------------------------------------------------
def _twins(kernel: str, dtype=torch.float32, **kw):
    """The loop kernel and `kernel` on equal weights. Widths of 8 and 16 floats: grouped
    matmuls want rows whose byte strides are multiples of 16."""
    loop = _moe(dim=8, hidden=16, dtype=dtype, expert_backend="loop", **kw)
    other = _moe(dim=8, hidden=16, dtype=dtype, expert_backend=kernel, **kw)
    other.load_state_dict(loop.state_dict())
    return loop, other


def _assert_same_results(reference: MoE, other: MoE, tokens: int, padding: bool = False, **tol) -> None:
    """Equal outputs, aux loss, stats and gradients (input and every parameter) on skewed routing."""
    with torch.no_grad():
        for m in (reference, other):
            m.router.weight.mul_(3.0)
            m.router.weight[0] += 0.5  # skewed: some experts overflow, some may get nothing
    x = _skewed_x(tokens, reference.dim).to(reference.router.weight.dtype)
    mask = (torch.arange(tokens) % 5 == 3) if padding else None
    results = []
    for m in (reference, other):
        xi = x.clone().requires_grad_(True)
        with kernels_used() as used:
            res = m(xi, padding_mask=mask)
        if m.experts.backend != "auto" and m.local_experts:
            assert used == [m.experts.backend], f"asked for the {m.experts.backend} kernel, ran {used}"
        g = torch.randn(res.output.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
        ((res.output * g).sum() + 0.3 * res.aux_loss).backward()
        results.append([res.output, res.aux_loss, res.stats.dropped_fraction, xi.grad]
                       + [p.grad for p in _params(m)])
    names = ["output", "aux", "dropped", "x", "router", "w1", "b1", "w2", "b2"]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(b, a, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("experts,top_k,factor,dropless,renorm,tokens", CASES)
@pytest.mark.parametrize("kernel", ["grouped", "padded"])
def test_static_kernels_match_the_loop(kernel, experts, top_k, factor, dropless, renorm, tokens, padding):
    """The static-shape kernels (device-side plan: torch._grouped_mm with offsets, GShard's
    padded buffers) give the loop kernel's outputs, statistics and gradients, dropping and
    padding included."""
    if padding and tokens < 5:
        pytest.skip("no padding among so few tokens")
    loop, other = _twins(kernel, experts=experts, top_k=top_k, capacity_factor=factor, dropless=dropless,
                         renormalize=renorm)
    _assert_same_results(loop, other, tokens, padding, rtol=1e-5, atol=1e-6)


def test_padded_kernel_takes_any_dtype_and_width():
    """float64 and widths grouped matmuls refuse (6, 10): the padded kernel matches the loop exactly."""
    loop, padded = _moe(expert_backend="loop"), _moe(expert_backend="padded")  # dim 6, hidden 10, float64
    _assert_same_results(loop, padded, 24, True, **F64)


def test_loop_chunks_cut_by_bytes_of_hidden_rows():
    """Hand values: experts without rows are skipped; a chunk closes before the limit is
    reached; an expert over the limit alone is a chunk of its own."""
    limit = expert_loop.CHUNK_BYTES
    assert expert_loop.chunks([3, 0, 5, 2, 7], limit // 8, 1) == [[0], [2, 3], [4]]
    assert expert_loop.chunks([20], limit, 4) == [[0]]
    assert expert_loop.chunks([1, 1, 1], 16, 4) == [[0, 1, 2]]  # small layers: one chunk
    assert expert_loop.chunks([0, 0], 16, 4) == []


@pytest.mark.parametrize("limit_rows", [1, 30], ids=["an-expert-a-chunk", "several-experts-a-chunk"])
def test_loop_kernel_in_chunks_equals_the_oracle(monkeypatch, limit_rows):
    """Large layers run the loop kernel's experts in chunks with a hidden buffer each. With the
    limit lowered to `limit_rows` hidden rows, 24 tokens run in several chunks (an unused expert
    among the five) and still give the oracle's outputs and gradients, also when the limit
    changes between forward and backward."""
    moe = _moe(experts=5, top_k=2, capacity_factor=4.0, expert_backend="loop")
    x = _skewed_x(24, moe.dim)
    x[:, 0] = x[:, 0].abs() + 1.0
    with torch.no_grad():
        moe.router.weight[4] = 0.0
        moe.router.weight[4, 0] = -20.0  # expert 4 is never chosen
    monkeypatch.setattr(expert_loop, "CHUNK_BYTES", limit_rows * moe.experts.w1.shape[-1] * 8)  # float64
    cuts = []
    real = expert_loop.chunks

    def cut_then_change_the_limit(*args):
        cuts.append(real(*args))
        expert_loop.CHUNK_BYTES = 1 << 62  # before backward, which reads the chunks off what forward saved
        return cuts[-1]

    monkeypatch.setattr(expert_loop, "chunks", cut_then_change_the_limit)
    res, (out, *_), lib_g, ref_g = _run_both(moe, x, oracle_capacity(24, 5, 2, 4.0))
    assert len(cuts) == 1 and len(cuts[0]) > 1 and 4 not in sum(cuts[0], []), cuts
    assert (max(map(len, cuts[0])) > 1) == (limit_rows > 1), cuts
    torch.testing.assert_close(res.output, out, **F64)
    _assert_grads_close(lib_g, ref_g, **F64)


@pytest.mark.parametrize("experts,top_k,factor,dropless,renorm,tokens", CASES)
def test_fused_local_experts_match_the_three_step_path(experts, top_k, factor, dropless, renorm, tokens):
    """The one-node gather + experts + combine (local experts) against gather, experts and
    combine as three autograd nodes (the path an expert-parallel layer takes)."""
    kw = dict(experts=experts, top_k=top_k, capacity_factor=factor, dropless=dropless, renormalize=renorm)
    fused, three_step = _moe(**kw), _moe(**kw)
    three_step.load_state_dict(fused.state_dict())
    three_step.local_experts = False
    _assert_same_results(three_step, fused, tokens, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,top_k,settings", [
    ("loop", 1, dict(capacity_factor=1.0)), ("loop", 2, dict(capacity_factor=0.8, renormalize=True)),
    ("loop", 2, dict(capacity_factor=0.8, z_loss_weight=0.1)),
    ("padded", 2, dict(capacity_factor=0.8, z_loss_weight=0.1)),
    ("loop", 2, dict(dropless=True, z_loss_weight=0.1)), ("padded", 2, dict(dropless=True, z_loss_weight=0.1))],
    ids=["loop-top1", "loop-top2-renormalize", "loop-top2-drops-zloss", "padded-top2-drops-zloss",
         "loop-top2-dropless", "padded-top2-dropless"])
def test_gradients_equal_finite_differences(backend, top_k, settings):
    """Every hand-written backward (router, dispatch, kernels) against torch.autograd.gradcheck's finite
    differences in float64: the task output and the aux loss (balance + z) with respect to the tokens
    and every weight, padding included. The oracle comparisons share the forward's routing and the three
    autograd nodes of an expert-parallel layer are held to the fused one; this needs neither."""
    from torch.func import functional_call

    torch.manual_seed(0)
    moe = MoE(4, 6, 4, top_k, noise_std=0.0, expert_backend=backend, **settings).double().train()
    names = [n for n, _ in moe.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for p in moe.parameters()]
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    projection = torch.randn(2, 6, 4, dtype=torch.float64)

    def loss(x, *weights):
        out = functional_call(moe, dict(zip(names, weights)), (x,), dict(padding_mask=padding))
        return (out.output * projection).sum() + 3.0 * out.aux_loss

    with kernels_used() as used:
        # (not fast_mode: it missed a 1% error in the balance loss's gradient)
        assert torch.autograd.gradcheck(loss, (x, *weights), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert set(used) == {backend}


@pytest.mark.parametrize("kernel", ["loop", "grouped", "padded"])
def test_an_expert_without_tokens_gets_zero_gradients(kernel):
    """An empty run gives that expert exactly zero weight and bias gradients."""
    _, moe = _twins(kernel, experts=4, top_k=1, dropless=kernel != "padded")
    with torch.no_grad():
        moe.router.weight[3] = -50.0  # positive tokens: expert 3's logit is far below the others
    x = _skewed_x(12, moe.dim).float().abs() + 0.1
    with kernels_used() as used:
        res = moe(x)
    assert used == [kernel]
    assert res.stats.expert_fraction[3] == 0
    res.output.sum().backward()
    for p in (moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2):
        assert p.grad is not None and torch.all(p.grad[3] == 0)
        assert p.grad[:3].abs().sum() > 0


def test_grouped_kernel_zeroes_the_rows_it_leaves_unwritten():
    """torch._grouped_mm leaves rows past the last offset as they were (garbage, maybe NaN):
    dropped assignments must still add exactly nothing, and no NaN may leak into gradients."""
    _, moe = _twins("grouped", experts=4, top_k=2, capacity_factor=0.25)
    x = _skewed_x(40, moe.dim).float().requires_grad_(True)
    with kernels_used() as used:
        res = moe(x)
    assert used == ["grouped"]
    assert res.stats.dropped_assignment_fraction > 0.5
    res.output.square().sum().backward()
    assert torch.isfinite(res.output).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters())


def test_auto_kernel_choice():
    """auto: the loop on a CPU outside torch.compile; inside it (static shapes), grouped
    matmuls in bfloat16 (the only dtype torch's meta kernel traces) and padded buffers
    otherwise; a dropless layer keeps the loop outside torch.compile on a GPU."""
    from unittest import mock

    from widenet.layers.experts import grouped_mm_works

    experts = _moe(dim=8, hidden=16, dtype=torch.float32).experts
    cpu = torch.device("cpu")
    assert experts.backend == "auto"
    assert experts.kernel(cpu, torch.float32) == "loop"
    with mock.patch("torch.compiler.is_compiling", return_value=True):
        assert experts.kernel(cpu, torch.float32) == "padded"
        assert experts.kernel(cpu, torch.bfloat16) == "grouped"
        assert experts.kernel(cpu, torch.float32, dropless=True) == "padded"
    assert grouped_mm_works(cpu, torch.float32, 8, 16)
    assert not grouped_mm_works(cpu, torch.float64, 8, 16)  # not a dtype the op takes
    assert not grouped_mm_works(cpu, torch.float32, 6, 16)  # rows of 24 bytes


def test_grouped_backend_errors():
    from widenet.layers.experts import grouped_mm_works

    with pytest.raises(ValueError, match="expert_backend must be one of"):
        MoE(6, 10, 4, expert_backend="cutlass")
    moe = _moe(dim=8, hidden=16, dtype=torch.float64, expert_backend="grouped")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16.*expert_backend='loop' or 'padded'"):
        moe(torch.randn(5, moe.dim, dtype=torch.float64))
    moe = _moe(dim=6, hidden=16, dtype=torch.float32, expert_backend="grouped")
    with pytest.raises(ValueError, match=r"multiples of 16 bytes \(dim 6, hidden 16"):
        moe(torch.randn(5, moe.dim))
    assert not grouped_mm_works(torch.device("cpu"), torch.float32, 6, 16)  # auto falls back


# ----------------------------------------------------------------------------
# The router's hand-written backward and the dispatch plan
# ----------------------------------------------------------------------------
def _router_by_autograd(router, x, valid, with_z):
    """The router's outputs from plain differentiable ops, an independent oracle for _RouterGate's
    backward: softmax, top-k, renormalisation, balance loss and z-loss as the spec writes them."""
    logits = x @ router.weight.t()  # (N, E)
    probs = logits.softmax(-1)
    weight, index = probs.topk(router.top_k, dim=-1)
    if router.renormalize:
        weight = weight / weight.sum(-1, keepdim=True)
    keep = torch.ones(x.shape[0], dtype=torch.bool) if valid is None else valid
    e, n_valid = probs.shape[1], keep.sum()
    counts = torch.bincount(index[keep].reshape(-1), minlength=e).to(probs.dtype)
    balance = e * torch.sum(counts / (router.top_k * n_valid) * probs[keep].mean(0))
    z = torch.logsumexp(logits[keep], -1).pow(2).mean()
    return weight.t(), balance, z


@pytest.mark.parametrize("top_k,renorm,padding", [(1, False, False), (2, False, True), (2, True, False),
                                                  (3, True, True)])
def test_router_backward_matches_autograd(top_k, renorm, padding):
    router = _moe(experts=5, top_k=top_k, renormalize=renorm).router
    x = _skewed_x(17, router.weight.shape[1])
    valid = (torch.arange(17) % 4 != 1) if padding else None
    g_w = torch.randn(top_k, 17, dtype=torch.float64)
    results = []
    for fn in (lambda xi: _router_by_autograd(router, xi, valid, True),
               lambda xi: (lambda r: (r.combine_weight, r.balance_loss, r.z_loss))(router(xi, valid, True))):
        xi = x.clone().requires_grad_(True)
        router.zero_grad()
        weight, balance, z = fn(xi)
        ((weight * g_w).sum() + 0.7 * balance + 0.3 * z).backward()
        results.append((weight.detach(), balance.detach(), z.detach(), xi.grad, router.weight.grad.clone()))
    for name, a, b in zip(("weight", "balance", "z", "x grad", "router grad"), *results):
        torch.testing.assert_close(b, a, **F64, msg=lambda m, n=name: f"{n}: {m}")


def test_dispatch_plan_host_and_device_forms_agree():
    """The host plan (the loop kernel's) and the device plan (static shapes) order the expert
    buffer alike: same rows, same kept counts; the device plan's row experts fit its counts."""
    from widenet.layers.moe import plan_dispatch

    gen = torch.Generator().manual_seed(4)
    index = torch.stack([torch.randint(0, 4, (30,), generator=gen), torch.randint(0, 4, (30,), generator=gen)])
    valid = torch.arange(30) % 7 != 0
    counts = torch.bincount(index[:, valid].reshape(-1), minlength=4)
    for capacity in (3, 8, 60):
        host = plan_dispatch(index, counts, capacity, valid, host=True)
        device = plan_dispatch(index, counts, torch.tensor(capacity), valid)
        torch.testing.assert_close(device.slot, host.slot, rtol=0, atol=0)
        torch.testing.assert_close(device.kept, host.kept, rtol=0, atol=0)
        assert host.runs == device.kept.tolist() == [min(c, capacity) for c in counts.tolist()]
        torch.testing.assert_close(device.inverse[device.slot], torch.arange(60), rtol=0, atol=0)
        expected = torch.repeat_interleave(torch.arange(5), torch.cat([device.kept, 60 - device.kept.sum(0, True)]))
        torch.testing.assert_close(device.row_expert, expected, rtol=0, atol=0)


def test_routing_statistics_are_computed_when_read():
    """A call leaves the tensors the statistics need; nothing is computed until one is read."""
    moe = _moe(experts=4, top_k=2, capacity_factor=0.5)
    res = moe(_skewed_x(20, moe.dim))
    assert "dropped_fraction" not in vars(res.stats) and "z_loss" not in vars(res.stats)
    first = res.stats.dropped_fraction
    assert res.stats.dropped_fraction is first  # computed once
    assert 0 < float(first) < 1


def test_top1_with_renormalize_warns_that_the_task_loss_never_reaches_the_router():
    """Top-1 renormalised: the combine weight is gate / gate = 1, so the router's gradient from the
    outputs is exactly zero (checked here) and only the balance loss trains it; training says so."""
    moe = _moe(experts=4, top_k=1, renormalize=True)
    x = _skewed_x(12, moe.dim)
    moe(x).output.square().sum().backward()
    assert torch.count_nonzero(moe.router.weight.grad) == 0
    moe.router.weight.grad = None
    (moe(x).aux_loss + moe(x).output.square().sum()).backward()
    assert torch.count_nonzero(moe.router.weight.grad) > 0  # the balance loss alone moves it
    with pytest.warns(UserWarning, match="top-1 with renormalize: every combine weight is then 1"):
        moe.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe.eval()  # evaluating such a model is fine
        _moe(experts=4, top_k=2, renormalize=True).train()
        _moe(experts=4, top_k=1).train()


def test_the_kernel_choice_on_a_gpu_without_touching_one():
    """auto off the CPU in float32 (no sync-free grouped matmul): a dropless layer takes the loop
    (padded buffers of N slots per expert would hold E/K times the work), a capacity layer the
    padded buffers. Neither question needs a GPU: the answer comes before any CUDA call."""
    from widenet.layers.experts import Experts

    experts = Experts(4, 8, 16)  # 4 experts, D 8, H 16
    cuda = torch.device("cuda")
    assert experts.kernel(cuda, torch.float32, dropless=True) == "loop"
    assert experts.kernel(cuda, torch.float32, dropless=False) == "padded"
    assert experts.kernel(torch.device("cpu"), torch.float32, dropless=False) == "loop"
    grouped = Experts(4, 8, 6, backend="grouped")  # 8 floats a row are 32 bytes, 6 are 24
    with pytest.raises(ValueError, match=r"multiples of 16 bytes \(dim 8, hidden 6 in torch.float32\)"):
        grouped.kernel(torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"multiples of 16 bytes \(dim 6, hidden 8 in torch.float32\)"):
        Experts(4, 6, 8, backend="grouped").kernel(torch.device("cpu"), torch.float32)


def test_expert_and_router_weights_start_at_their_documented_scales():
    """Each expert's matrices Xavier-uniform over that expert's fan-in + fan-out (bound sqrt(6 / (D + H)),
    std bound / sqrt(3)); the router normal with std D^-1/2; biases zero. Measured on a layer large
    enough that the experts' sample std is within 2% of the law's."""
    torch.manual_seed(0)
    dim, hidden = 256, 1024
    moe = MoE(dim=dim, hidden_dim=hidden, num_experts=4, top_k=2)
    bound = math.sqrt(6 / (dim + hidden))
    for w in (moe.experts.w1, moe.experts.w2):
        assert float(w.abs().max()) <= bound
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    router = moe.router.weight  # 1024 draws: the sample std is within 2.2% (one sigma) of the law's
    assert float(router.std()) == pytest.approx(dim ** -0.5, rel=0.08)
    assert abs(float(router.mean())) <= 4 * dim ** -0.5 / router.numel() ** 0.5
    assert not moe.experts.b1.any() and not moe.experts.b2.any()


def test_a_call_without_tokens_stays_in_the_graph():
    """Zero tokens gave an output cut off from autograd: .backward() through it raised, and x got no
    gradient (nn.Linear on the same x gives a (0, D) one)."""
    x = torch.randn(0, 8, requires_grad=True)
    out = MoE(8, 16)(x)
    assert out.output.shape == (0, 8) and out.output.requires_grad
    (out.output.sum() + out.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == (0, 8)
    with torch.no_grad():
        assert not MoE(8, 16)(x).output.requires_grad
