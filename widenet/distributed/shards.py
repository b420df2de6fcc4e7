"""Marks on parameters that hold one rank's shard of a tensor split over a process group.

Expert parallelism marks its expert weights; LAMB's trust ratio and gradient
clipping then sum the squared norms over the group, as for the whole tensor.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["is_shard", "mark_sharded", "shard_group"]

_SHARD_GROUP = "_widenet_shard_group"


def mark_sharded(param: torch.Tensor, group: Any) -> None:
    """Declare ``param`` one rank's shard of a tensor split over process ``group`` (None: the default group)."""
    setattr(param, _SHARD_GROUP, group)


def is_shard(param: torch.Tensor) -> bool:
    return hasattr(param, _SHARD_GROUP)


def shard_group(param: torch.Tensor) -> Any:
    """The process group of a marked shard."""
    return getattr(param, _SHARD_GROUP)
