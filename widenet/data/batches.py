"""Epoch orders and batch counts shared by image and text data: deterministic, exactly resumable
orders from private generators seeded by (seed, epoch); torch's global RNG is never touched."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["epoch_order", "num_batches", "seed_for"]


def seed_for(seed: int, epoch: int) -> int:
    """A 63-bit generator seed mixing ``seed`` and ``epoch`` (stable across runs)."""
    digest = hashlib.sha256(f"widenet-epoch-order:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """Deterministic permutation of ``range(num_examples)`` for one epoch.

    Uses a private generator seeded from (seed, epoch); the global RNG is untouched.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    generator = torch.Generator().manual_seed(seed_for(seed, epoch))
    return torch.randperm(num_examples, generator=generator)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches an epoch of ``n`` examples yields."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)
