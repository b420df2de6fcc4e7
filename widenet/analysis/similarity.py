"""How alike the blocks' outputs are: mean cosine similarity of token vectors.

WideNet's per-block LayerNorms are meant to keep blocks that share every
weight from collapsing into one function; this measures it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def block_similarity(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(L, L) matrix: mean over tokens of cos(block_i output, block_j output)."""
    was_training = model.training
    model.eval()
    states = model(images, return_hidden_states=True).hidden_states  # L x (B, T, D)
    model.train(was_training)
    unit = torch.stack([F.normalize(s.float(), dim=-1) for s in states])  # (L, B, T, D)
    return torch.einsum("ibtd,jbtd->ij", unit, unit) / (unit.shape[1] * unit.shape[2])
