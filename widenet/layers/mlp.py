"""Dense position-wise feed-forward block."""

from __future__ import annotations

import torch
from torch import nn

from .experts import gelu_approximation


class Mlp(nn.Module):
    """Linear D -> H, GELU, dropout, Linear H -> D. x: (..., D) -> (..., D).
    activation: "gelu" (exact) or "gelu_tanh" (tanh approximation)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, activation: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=gelu_approximation(activation))
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))
