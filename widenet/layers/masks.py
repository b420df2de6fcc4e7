"""Padding masks: one convention inside widenet, and the other one accepted only by name.

widenet's ``padding_mask`` is a bool tensor, True where a token is padding.
Hugging Face's ``attention_mask`` is the opposite (1 = a real token), often as
integers, so a 0/1 integer mask cannot be read without knowing which was
meant: an integer ``padding_mask`` is refused, and the keep convention is
passed as ``keep_mask`` (bool, or 0/1 numbers, as Hugging Face takes them).
"""

from __future__ import annotations

import torch

__all__ = ["resolve_padding_mask"]


def resolve_padding_mask(shape: torch.Size | tuple[int, ...], padding_mask: torch.Tensor | None = None,
                         keep_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The bool padding mask (True = padding) of tokens of `shape`, from `padding_mask` (bool,
    True = padding) or `keep_mask` (bool or 0/1 numbers, True/1 = a real token); None if neither."""
    if padding_mask is not None and keep_mask is not None:
        raise ValueError("give padding_mask (True = padding) or keep_mask (1 = a real token), not both")
    name, mask = ("padding_mask", padding_mask) if keep_mask is None else ("keep_mask", keep_mask)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(mask.shape)} does not match the tokens' {tuple(shape)}")
    if name == "padding_mask":
        if mask.dtype != torch.bool:
            raise TypeError(f"padding_mask must be a bool tensor, True where a token is padding; got dtype "
                            f"{mask.dtype}. For a mask with 1 where a token is real (Hugging Face's "
                            "attention_mask) pass keep_mask= instead")
        return mask
    if mask.dtype == torch.bool:
        return ~mask
    if mask.dtype.is_complex:
        raise TypeError(f"keep_mask must be bool or 0/1 numbers, got dtype {mask.dtype}")
    # (NaN too; not while torch.compile traces: a data-dependent branch breaks fullgraph)
    if mask.numel() and not torch.compiler.is_compiling() and not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("keep_mask must hold only 0 (padding) and 1 (a real token)")
    return mask == 0
