"""Hypothesis properties of the MoE layer (widenet.layers.moe.MoE) against the einsum oracle.

Every example draws a layer (experts, top-k, capacity factor, dropless,
renormalize, expert kernel, train or eval mode), skewed router weights that
make experts overflow, and a call (token count from 0 up, 2-D or 3-D input,
a padding pattern). The layer runs in float64 without router noise and is
compared with tests/moe_oracle.py (GShard's one-hot einsums, written from the
spec) on the same weights and the non-padding tokens:

* capacity: the layer's capacity() equals the oracle's formula (and the exact
  rational ceil(C * K * N / E)); dropless drops nothing;
* which assignments are kept, read off the layer's output token by token:
  never more than the capacity per expert, and exactly the spec's priority
  order (all first choices in token order, then all second choices, ...);
* tokens that lost every assignment, and padding, get exactly zero output;
* outputs, the balance loss and the gradients (input and every parameter)
  equal the oracle's.

Examples are derandomized so CI runs the same ones every time.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from widenet.layers.experts import grouped_mm_works
from widenet.layers.moe import MoE, MoEOutput

if str(Path(__file__).resolve().parent) not in sys.path:  # the oracle lives next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_oracle import dispatch_tensor, einsum_moe, kept_assignments, oracle_balance_loss, oracle_capacity
from test_moe import kernels_used

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: a second thread only adds overhead

DIM, HIDDEN = 4, 8  # rows of 16 and 32 bytes in float32: what the grouped kernel needs
AUX_WEIGHT = 0.3  # the balance loss's weight in the loss whose gradients are compared
F64 = {"rtol": 1e-9, "atol": 1e-11}
F32 = {"rtol": 1e-4, "atol": 1e-5}
BINARY_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # exact in floating point
PROPERTIES = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------
# Drawing a layer and a call
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    experts: int
    top_k: int
    factor: float
    eval_factor: float | None
    training: bool
    dropless: bool
    renormalize: bool
    backend: str
    shape: tuple[int, ...]  # the token axes: (N,) or (B, T)
    padding: tuple[bool, ...] | None  # one per token, True = padding
    skew: float  # scale of the router weights: larger, more lopsided routing
    seed: int

    @property
    def tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def active_factor(self) -> float:
        return self.eval_factor if not self.training and self.eval_factor is not None else self.factor


@st.composite
def cases(draw: st.DrawFn, backends: tuple[str, ...] = ("loop", "padded")) -> Case:
    # sampled_from draws evenly (st.integers favours its bounds: mostly one expert, no tokens).
    experts = draw(st.sampled_from(range(1, 7)))
    shape = draw(st.one_of(st.tuples(st.sampled_from(range(25))),
                           st.tuples(st.sampled_from(range(4)), st.sampled_from(range(9)))))
    n = math.prod(shape)
    padding = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n).map(tuple)))
    return Case(experts=experts, top_k=draw(st.sampled_from(range(1, min(experts, 3) + 1))),
                factor=draw(st.sampled_from(BINARY_FACTORS)),
                eval_factor=draw(st.one_of(st.none(), st.sampled_from(BINARY_FACTORS))),
                training=draw(st.booleans()), dropless=draw(st.booleans()), renormalize=draw(st.booleans()),
                backend=draw(st.sampled_from(backends)), shape=shape, padding=padding,
                skew=draw(st.sampled_from((0.5, 1.0, 2.5))), seed=draw(st.integers(0, 2 ** 16)))


def build(case: Case, dtype: torch.dtype) -> MoE:
    """The drawn layer with weights from the case's seed (non-zero biases, skewed router)."""
    moe = MoE(DIM, HIDDEN, case.experts, case.top_k, capacity_factor=case.factor,
              eval_capacity_factor=case.eval_factor, dropless=case.dropless, renormalize=case.renormalize,
              noise_std=0.0, expert_backend=case.backend).to(dtype)
    moe.train(case.training)
    gen = torch.Generator().manual_seed(case.seed)
    scales = {"router.weight": case.skew, "experts.w1": 0.5, "experts.b1": 0.3, "experts.w2": 0.5,
              "experts.b2": 0.3}
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * scales[name])
        moe.router.weight[0] += 0.5 * case.skew  # expert 0 is everyone's favourite: it overflows
    return moe


def parameters(moe: MoE) -> list[torch.Tensor]:
    """In the oracle's argument order: router weight, w1, b1, w2, b2."""
    return [moe.router.weight, moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2]


# ----------------------------------------------------------------------------
# One call of the layer and of the oracle, with gradients
# ----------------------------------------------------------------------------
@dataclass
class LayerRun:
    result: MoEOutput
    x_grad: torch.Tensor | None
    grads: list[torch.Tensor | None]


@dataclass
class OracleRun:
    output: torch.Tensor  # (n, D), non-padding tokens only
    probs: torch.Tensor  # (n, E)
    index: torch.Tensor  # (n, K)
    aux: torch.Tensor
    x_grad: torch.Tensor
    grads: list[torch.Tensor]


def run_layer(moe: MoE, x: torch.Tensor, mask: torch.Tensor | None, upstream: torch.Tensor) -> LayerRun:
    x = x.clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    result = moe(x, padding_mask=mask)
    ((result.output * upstream).sum() + AUX_WEIGHT * result.aux_loss).backward()
    return LayerRun(result, x.grad, [p.grad for p in parameters(moe)])


def run_oracle(moe: MoE, x: torch.Tensor, capacity: int, upstream: torch.Tensor) -> OracleRun:
    """The oracle on the tokens x (n, D), its own copy of the weights; the balance loss by the
    spec's formula E * sum_i m_i P_i, differentiable."""
    x = x.clone().requires_grad_(True)
    weights = [p.detach().clone().requires_grad_(True) for p in parameters(moe)]
    out, probs, index = einsum_moe(x, *weights, moe.top_k, capacity, renormalize=moe.router.renormalize)
    counts = torch.bincount(index.reshape(-1), minlength=moe.num_experts).to(probs.dtype)
    aux = moe.num_experts * torch.sum(counts / index.numel() * probs.mean(0))
    ((out * upstream).sum() + AUX_WEIGHT * aux).backward()
    return OracleRun(out.detach(), probs.detach(), index, aux.detach(), x.grad, [w.grad for w in weights])


def inputs(case: Case, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x (*shape, D), the padding mask (*shape) or None, and the upstream gradient (*shape, D)."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    x = torch.randn(*case.shape, DIM, generator=gen, dtype=dtype)
    upstream = torch.randn(*case.shape, DIM, generator=gen, dtype=dtype)
    mask = None if case.padding is None else torch.tensor(case.padding, dtype=torch.bool).reshape(case.shape)
    return x, mask, upstream


def exact_capacity(tokens: int, experts: int, top_k: int, factor: float) -> int:
    """ceil(C * K * N / E) in rational arithmetic, C read as the decimal it was written as, and at
    most N (an expert gets at most one assignment per token)."""
    return min(math.ceil(Fraction(repr(factor)) * top_k * tokens / experts), tokens)


# ----------------------------------------------------------------------------
# Reading the layer's decisions off its output
# ----------------------------------------------------------------------------
def expert_outputs(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert's FFN on every token: x (n, D) -> (n, E, D)."""
    w1, b1, w2, b2 = (p.detach() for p in parameters(moe)[1:])
    hidden = F.gelu(torch.einsum("nd,edh->neh", x, w1) + b1)
    return torch.einsum("neh,ehd->ned", hidden, w2) + b2


def observed_kept(moe: MoE, x: torch.Tensor, output: torch.Tensor, probs: torch.Tensor,
                  index: torch.Tensor) -> torch.Tensor | None:
    """(n, K) bool: which of each token's assignments the layer's output (n, D) contains;
    None when some token's choices cannot be told apart (a gate weight below float64's
    resolution of the output, e.g. a softmax probability of 1e-20).

    output[t] must be the sum of w_j * FFN_{e_j}(x[t]) over some subset of the token's
    choices j; the subset is found by trying all 2^K of them.
    """
    weight = probs.gather(1, index)  # (n, K)
    if moe.router.renormalize:
        weight = weight / weight.sum(1, keepdim=True)
    parts = weight.unsqueeze(-1) * expert_outputs(moe, x).gather(
        1, index.unsqueeze(-1).expand(-1, -1, DIM))  # (n, K, D)
    subsets = torch.tensor(list(itertools.product((0.0, 1.0), repeat=moe.top_k)), dtype=x.dtype)  # (2^K, K)
    candidates = torch.einsum("sk,nkd->nsd", subsets, parts)  # (n, 2^K, D)
    error, best = (candidates - output.unsqueeze(1)).abs().amax(-1).sort(1)  # (n, 2^K) each, best first
    tolerance = 1e-9 * (1 + output.abs().amax(-1))  # (n,)
    assert bool((error[:, 0] <= tolerance).all()), "an output is no sum of its token's expert outputs"
    if not bool((error[:, 1] > 100 * tolerance).all()):
        return None
    return subsets[best[:, 0]].bool()


def spec_kept(index: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(n, K) bool: the spec's priority with plain loops. Assignments in the order (choice,
    token); one is kept when fewer than `capacity` earlier ones went to its expert."""
    n, k = index.shape
    kept = torch.zeros(n, k, dtype=torch.bool)
    load = [0] * num_experts
    for j in range(k):
        for t in range(n):
            e = int(index[t, j])
            kept[t, j] = load[e] < capacity
            load[e] += 1
    return kept


# ----------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------
@PROPERTIES
@given(case=cases())
def test_moe_matches_oracle_and_keeps_the_priority_order(case: Case) -> None:
    moe = build(case, torch.float64)
    x, mask, upstream = inputs(case, torch.float64)
    valid = torch.ones(case.tokens, dtype=torch.bool) if mask is None else ~mask.reshape(-1)
    n = int(valid.sum())

    capacity = moe.capacity(n)
    if case.dropless:
        assert capacity == n  # a token's K choices are distinct experts
    else:
        assert capacity == oracle_capacity(n, case.experts, case.top_k, case.active_factor) \
            == exact_capacity(n, case.experts, case.top_k, case.active_factor)

    run = run_layer(moe, x, mask, upstream)
    out = run.result.output
    assert out.shape == x.shape and out.dtype == torch.float64
    flat_out = out.detach().reshape(-1, DIM)
    assert torch.count_nonzero(flat_out[~valid]) == 0, "padding got output"
    if run.x_grad is not None:
        assert torch.count_nonzero(run.x_grad.reshape(-1, DIM)[~valid]) == 0, "padding got a gradient"

    if n == 0:  # nothing routed: zero output, zero loss, zero gradients
        assert run.result.aux_loss.item() == 0.0
        assert run.result.stats.dropped_fraction.item() == 0.0
        for g in [run.x_grad, *run.grads]:
            assert g is None or torch.count_nonzero(g) == 0
        return

    tokens = x.reshape(-1, DIM)[valid]
    ref = run_oracle(moe, tokens, capacity, upstream.reshape(-1, DIM)[valid])

    # Which assignments the layer kept, against the spec's priority and capacity.
    expected = spec_kept(ref.index, case.experts, capacity)
    kept = observed_kept(moe, tokens, flat_out[valid], ref.probs, ref.index)
    event("kept assignments read off the output" if kept is not None else "choices indistinguishable")
    if kept is not None:  # None is rare at these router scales; everything else is still compared
        load = torch.bincount(ref.index[kept], minlength=case.experts)
        assert int(load.max()) <= capacity, f"expert load {load.tolist()} above capacity {capacity}"
        if case.dropless:
            assert bool(kept.all()), "dropless dropped an assignment"
        for e in range(case.experts):  # a later choice at an expert is served only if every earlier one is
            served = kept.t()[ref.index.t() == e]  # choice-major: every 1st choice, then every 2nd, ...
            assert not bool((served[1:] & ~served[:-1]).any()), f"expert {e} served out of priority order"
        torch.testing.assert_close(kept, expected, rtol=0, atol=0)
    lost = ~expected.any(1)  # tokens that lost every assignment
    assert torch.count_nonzero(flat_out[valid][lost]) == 0, "a dropped token got output"

    # Statistics.
    stats = run.result.stats
    assert stats.dropped_fraction.item() == pytest.approx(lost.double().mean().item(), abs=1e-7)
    assert stats.dropped_assignment_fraction.item() == pytest.approx(1 - expected.double().mean().item(), abs=1e-7)
    fraction = torch.bincount(ref.index.reshape(-1), minlength=case.experts).double() / ref.index.numel()
    torch.testing.assert_close(stats.expert_fraction.double(), fraction)

    # Outputs, losses and gradients.
    torch.testing.assert_close(flat_out[valid], ref.output, **F64)
    torch.testing.assert_close(run.result.aux_loss.detach(), ref.aux, **F64)
    assert stats.balance_loss.item() == pytest.approx(oracle_balance_loss(ref.probs, ref.index, case.experts),
                                                      rel=1e-9, abs=1e-12)
    assert run.x_grad is not None
    torch.testing.assert_close(run.x_grad.reshape(-1, DIM)[valid], ref.x_grad, **F64)
    for name, got, want in zip(("router.weight", "w1", "b1", "w2", "b2"), run.grads, ref.grads):
        assert got is not None, f"no gradient for {name}"
        torch.testing.assert_close(got, want, **F64, msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.skipif(not grouped_mm_works(torch.device("cpu"), torch.float32, DIM, HIDDEN),
                    reason="torch._grouped_mm cannot run the experts on this CPU in float32")
@settings(PROPERTIES, max_examples=80)
@given(case=cases(backends=("grouped",)))
def test_grouped_kernel_matches_oracle_in_float32(case: Case) -> None:
    """The grouped kernel takes float32 only: the same comparison at float32 tolerance."""
    moe = build(case, torch.float32)
    x, mask, upstream = inputs(case, torch.float32)
    valid = torch.ones(case.tokens, dtype=torch.bool) if mask is None else ~mask.reshape(-1)
    n = int(valid.sum())
    with kernels_used() as used:
        run = run_layer(moe, x, mask, upstream)
    assert used == ([] if case.tokens == 0 else ["grouped"])
    flat_out = run.result.output.detach().reshape(-1, DIM)
    assert torch.count_nonzero(flat_out[~valid]) == 0
    if n == 0:
        assert run.result.aux_loss.item() == 0.0
        return
    capacity = moe.capacity(n)
    ref = run_oracle(moe, x.reshape(-1, DIM)[valid], capacity, upstream.reshape(-1, DIM)[valid])
    kept = kept_assignments(dispatch_tensor(ref.index, case.experts, capacity), ref.index)
    assert run.result.stats.dropped_fraction.item() == pytest.approx((~kept.any(1)).double().mean().item(),
                                                                     abs=1e-6)
    torch.testing.assert_close(flat_out[valid], ref.output, **F32)
    torch.testing.assert_close(run.result.aux_loss.detach(), ref.aux, **F32)
    torch.testing.assert_close(run.x_grad.reshape(-1, DIM)[valid], ref.x_grad, **F32)
    for got, want in zip(run.grads, ref.grads):
        torch.testing.assert_close(got, want, **F32)


@PROPERTIES
@given(tokens=st.integers(0, 5000), experts=st.integers(1, 64), top_k=st.integers(1, 4),
       factor=st.one_of(st.sampled_from(BINARY_FACTORS), st.integers(1, 400).map(lambda c: c / 100)),
       dropless=st.booleans())
def test_capacity_formula(tokens: int, experts: int, top_k: int, factor: float, dropless: bool) -> None:
    """capacity() is ceil(C * K * N / E) capped at N, exactly (decimal factors included), N when dropless,
    the same as an int and as a device tensor; for factors exact in binary it is also the
    oracle's plain floating-point formula."""
    top_k = min(top_k, experts)
    moe = MoE(4, 4, experts, top_k, capacity_factor=factor, dropless=dropless)
    want = tokens if dropless else exact_capacity(tokens, experts, top_k, factor)
    assert moe.capacity(tokens) == want
    assert int(moe.capacity(torch.tensor(tokens))) == want
    if factor in BINARY_FACTORS and not dropless:
        assert oracle_capacity(tokens, experts, top_k, factor) == want
