"""Stochastic depth (Huang et al. 2016), as DeiT and timm train ViTs.

In training, each sample's residual branch is dropped with probability p and
kept branches are scaled by 1 / (1 - p), so the expected output is unchanged;
in evaluation the branch always passes. With weights shared across blocks
(WideNet, ALBERT) this still regularises: a dropped branch means the shared
module is applied fewer times to that sample.
"""

from __future__ import annotations

import torch


def drop_path(branch: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """branch: (B, ...) -> the same, with whole samples zeroed at rate p (training only)."""
    if p == 0.0 or not training:
        return branch
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop path rate must be in [0, 1), got {p}")
    keep = 1.0 - p
    mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep)  # (B, 1, ...)
    return branch * mask.div_(keep)


def block_rates(rate: float, depth: int) -> list[float]:
    """Linear rule (Huang et al.; DeiT): 0 for the first block rising to `rate` for the last."""
    if depth == 1:
        return [rate]
    return [rate * i / (depth - 1) for i in range(depth)]
