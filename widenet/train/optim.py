"""Optimizers, parameter groups, learning-rate schedules and gradient clipping.

The WideNet paper trains with LAMB (You et al., 2019, "Large Batch Optimization
for Deep Learning") plus linear warmup and decay; :func:`build_optimizer` and
:func:`build_schedule` give that setup (and AdamW as an alternative).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..distributed.shards import is_shard, shard_group

__all__ = [
    "Lamb",
    "NO_DECAY_MODULES",
    "NO_DECAY_SUFFIXES",
    "OPTIMIZERS",
    "SCHEDULES",
    "WarmupDecay",
    "build_optimizer",
    "build_schedule",
    "param_groups",
]

OPTIMIZERS = ("adamw", "lamb")
SCHEDULES = ("linear", "cosine", "constant")

#: Module types whose own (direct) parameters are never weight-decayed.
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.Embedding)

#: Parameter-name suffixes that are never weight-decayed.
NO_DECAY_SUFFIXES: tuple[str, ...] = (
    "cls_token",
    "pos_embed",
    "position_embeddings",
    "token_type_embeddings",
)

_DEFAULT_EPS = {"adamw": 1e-8, "lamb": 1e-6}


# --------------------------------------------------------------------------- LAMB


class Lamb(torch.optim.Optimizer):
    """LAMB: Adam moments + decoupled weight decay + a layer-wise trust ratio.

    For every parameter tensor ``w`` with gradient ``g`` at step ``t``::

        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        u = (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps) + weight_decay * w
        r = ||w|| / ||u||      (r = 1 if either norm is 0, or if trust_ratio is False)
        w = w - lr * r * u

    Norms are Frobenius norms of the whole tensor ("layer-wise").  Each param
    group may set ``trust_ratio=False`` (e.g. biases and norm weights) to use
    ``r = 1``, i.e. a plain AdamW-style step.  Sparse gradients are rejected.

    A parameter that holds one rank's shard of a larger tensor (expert
    parallelism) is marked with :func:`mark_sharded`; its two squared norms
    are then summed over the shard's process group, so ``r`` is that of the
    whole tensor. FSDP's DTensor parameters reduce their norms by themselves.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_ratio: bool = True,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Lamb: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"Lamb: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Lamb: weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            trust_ratio=bool(trust_ratio),
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one optimization step; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update_param(p, group)
        return loss

    def _update_param(self, p: torch.Tensor, group: dict) -> None:
        """Apply the LAMB update to one parameter tensor in place."""
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("Lamb does not support sparse gradients; use a dense optimizer")
        if torch.is_complex(p):
            raise RuntimeError("Lamb does not support complex parameters")
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = int(state["step"]) + 1
        update = _adam_direction(state, grad, group["betas"], group["eps"])
        if group["weight_decay"] != 0.0:
            update.add_(p, alpha=group["weight_decay"])
        if group.get("trust_ratio", True):
            update.mul_(_trust_ratio(p, update))
        p.add_(update, alpha=-group["lr"])


def _adam_direction(
    state: dict, grad: torch.Tensor, betas: tuple[float, float], eps: float
) -> torch.Tensor:
    """Update the Adam moments in ``state`` and return the bias-corrected direction."""
    beta1, beta2 = betas
    step = state["step"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (exp_avg_sq / (1.0 - beta2**step)).sqrt_().add_(eps)
    return (exp_avg / (1.0 - beta1**step)).div_(denom)


def _trust_ratio(weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``||weight|| / ||update||`` as a 0-dim tensor, or 1 when either norm is 0."""
    if is_shard(weight):
        squares = torch.stack([torch.linalg.vector_norm(weight), torch.linalg.vector_norm(update)]).square()
        torch.distributed.all_reduce(squares, group=shard_group(weight))  # sum over the shards
        w_norm, u_norm = squares.sqrt().unbind()
    else:
        w_norm = torch.linalg.vector_norm(weight)
        u_norm = torch.linalg.vector_norm(update)
    ok = (w_norm > 0) & (u_norm > 0)
    return torch.where(ok, w_norm / torch.where(ok, u_norm, 1.0), 1.0).to(update.dtype)


# ------------------------------------------------------------------ param groups


def _is_no_decay(name: str, param: torch.Tensor, owned_by_no_decay: set[int]) -> bool:
    """The no-decay rule of :func:`param_groups` for one named parameter."""
    return (
        param.ndim <= 1
        or id(param) in owned_by_no_decay
        or name.endswith(NO_DECAY_SUFFIXES)
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of ``model`` into a decay and a no-decay group.

    A parameter goes to the no-decay group (``weight_decay=0``,
    ``trust_ratio=False``) when any of these holds:

    * ``param.ndim <= 1`` (biases, norm scales/shifts, scalars);
    * it is a direct parameter of a module that is an instance of
      :data:`NO_DECAY_MODULES` (``nn.LayerNorm``, ``nn.Embedding``);
    * its full dotted name from ``model.named_parameters()`` ends with one of
      :data:`NO_DECAY_SUFFIXES` (``cls_token``, ``pos_embed``,
      ``position_embeddings``, ``token_type_embeddings``); plain string
      suffix matching, so ``decoder_pos_embed`` also matches.

    Everything else goes to the decay group (``weight_decay=weight_decay``,
    ``trust_ratio=True``).  Parameters with ``requires_grad=False`` are
    skipped, and each parameter appears once even if reachable through several
    module paths (shared modules / tied weights).  Empty groups are dropped;
    the decay group comes first.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    owned = {
        id(p)
        for module in model.modules()
        if isinstance(module, NO_DECAY_MODULES)
        for p in module.parameters(recurse=False)
    }
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():  # deduplicates shared parameters
        if not param.requires_grad:
            continue
        (no_decay if _is_no_decay(name, param, owned) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), "trust_ratio": True},
        {"params": no_decay, "weight_decay": 0.0, "trust_ratio": False},
    ]
    return [g for g in groups if g["params"]]


# -------------------------------------------------------------------- optimizers


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float | None = None,
) -> torch.optim.Optimizer:
    """Build ``'adamw'`` or ``'lamb'`` over :func:`param_groups` of ``model``.

    ``eps`` defaults to 1e-8 for AdamW and 1e-6 for LAMB.  Biases, norms,
    embeddings and position/class tokens get no weight decay (and no LAMB
    trust ratio).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters")
    eps = _DEFAULT_EPS[key] if eps is None else eps
    if key == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for group in groups:
        group.pop("trust_ratio")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# --------------------------------------------------------------------- schedules


class WarmupDecay:
    """Multiplicative lr factor: linear warmup, then linear/cosine/constant decay.

    Called with ``s`` = ``scheduler.last_epoch``, the 0-based index of the
    optimizer update the lr is used for (``s = 0`` right after construction)::

        s <  W:  f = (s + 1) / W                      # first update: 1/W, never 0
        s >= W:  p = min(1, (s - W) / (T - W))        # p = 1 when T == W
                 linear:   f = m + (1 - m) * (1 - p)
                 cosine:   f = m + (1 - m) * 0.5 * (1 + cos(pi * p))
                 constant: f = 1

    with ``W = warmup_steps``, ``T = total_steps``, ``m = min_lr_ratio``.  So the
    factor reaches 1 at the last warmup update, stays 1 at ``s = W`` and reaches
    ``m`` at ``s = T`` (the first update after a ``T``-update run).  A class
    (not a lambda) so ``LambdaLR.state_dict`` stores its settings.
    """

    def __init__(
        self, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float
    ) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.decay = decay
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, s: int) -> float:
        warmup, total, low = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if s < warmup:
            return (s + 1) / warmup
        if self.decay == "constant":
            return 1.0
        p = 1.0 if total <= warmup else min(1.0, (s - warmup) / (total - warmup))
        if self.decay == "linear":
            return low + (1.0 - low) * (1.0 - p)
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * p))

    def __repr__(self) -> str:
        return (
            f"WarmupDecay(warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, "
            f"decay={self.decay!r}, min_lr_ratio={self.min_lr_ratio})"
        )


def build_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    decay: str = "linear",
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then ``decay`` in ('linear', 'cosine', 'constant').

    See :class:`WarmupDecay` for the exact factor.  Call ``scheduler.step()``
    once after every ``optimizer.step()``.  The scheduler round-trips through
    ``state_dict()`` / ``load_state_dict()``.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
        raise ValueError(f"warmup_steps must be an int, got {warmup_steps!r}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    if decay not in SCHEDULES:
        raise ValueError(f"unknown decay {decay!r}; choose one of {', '.join(SCHEDULES)}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    factor = WarmupDecay(warmup_steps, total_steps, decay, min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
