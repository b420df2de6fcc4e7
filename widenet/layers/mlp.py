"""Dense position-wise feed-forward block."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """Linear D -> H, GELU, dropout, Linear H -> D. x: (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))
