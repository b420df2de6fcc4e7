"""Whether this machine has the memory for a model: refused up front with one line, not found out
by the kernel's out-of-memory killer (which ends the process without a word once the weights,
each small enough to be granted, together fill the machine)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["available_memory", "check_activations_fit", "check_fits_memory", "check_model_fits", "parameter_bytes",
           "readable_size"]

_CGROUP = Path("/sys/fs/cgroup")


def available_memory() -> int | None:
    """Bytes this process can still take on this machine: Linux's MemAvailable plus free swap, and
    no more than the cgroup's limit less what it holds other than reclaimable file cache; None
    where that cannot be read (then nothing is refused)."""
    found = []
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        found.append((int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])) * 1024)
    except (OSError, ValueError, KeyError, IndexError):
        pass
    # cgroup v2, then v1 (older container hosts): limit, usage, and the stat naming reclaimable cache
    for folder, limit_file, used_file, cache in ((_CGROUP, "memory.max", "memory.current", "inactive_file"),
                                                 (_CGROUP / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                                                  "total_inactive_file")):
        try:
            limit = (folder / limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 2**62:  # no limit (v1 writes a number near 2**63)
                continue
            used = int((folder / used_file).read_text())
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            used -= int(stat.get(cache, 0))  # page cache the kernel gives back when asked
            found.append(max(int(limit) - used, 0))
        except (OSError, ValueError):
            pass
    return min(found) if found else None


def check_fits_memory(num_bytes: int, what: str) -> None:
    """MemoryError when num_bytes exceed the memory available (nothing when it is unknown, or when
    WIDENET_NO_MEMORY_CHECK=1 says the user knows better)."""
    if os.environ.get("WIDENET_NO_MEMORY_CHECK") == "1":
        return
    free = available_memory()
    if free is not None and num_bytes > free:
        raise MemoryError(f"{what} need {readable_size(num_bytes)}, more than the {readable_size(free)} of memory "
                          "available (WIDENET_NO_MEMORY_CHECK=1 skips this check)")


def check_activations_fit(examples: int, tokens: int, encoder: Any, what: str,
                          amp: torch.dtype | None = None) -> None:
    """MemoryError when even a lower bound of what autograd keeps for one batch of `examples` inputs
    of `tokens` tokens through `encoder` (an EncoderConfig) exceeds the memory; a warning when it
    takes more than half of it (the kernel's out-of-memory killer ends a process without a word).
    Per block and token: 8 vectors of width D (the block's input, q, k, v, the attention's output,
    the FFN's input, ...) and 2 of the FFN's hidden width (before and after the activation; in an
    MoE block top_k x the expert width, times the capacity factor when below 1), at 4 bytes a value,
    2 under a 16-bit autocast `amp`; with activation checkpointing, each block's input and one
    block's whole while it is recomputed. Measured with saved-tensor hooks on the tiny presets (top-1
    and top-2, capacity factor 0.5 and 1.2), what autograd saves is 1.05-1.5x this bound in float32
    and 1.2-1.8x under bf16."""
    moe_ids, moe = set(encoder.moe_block_ids), encoder.moe
    kept = 1.0 if moe.dropless else min(1.0, moe.capacity_factor)  # the share of assignments an expert takes
    expert = kept * moe.top_k * (encoder.expert_dim or encoder.mlp_dim)
    per_block = [8 * encoder.dim + 2 * (expert if i in moe_ids else encoder.mlp_dim) for i in range(encoder.depth)]
    vectors = encoder.depth * encoder.dim + max(per_block) if encoder.activation_checkpointing else sum(per_block)
    need = int(examples * tokens * vectors * (4 if amp is None else torch.finfo(amp).bits // 8))
    check_fits_memory(need, what)
    free = available_memory()
    if free is not None and need > free / 2 and os.environ.get("WIDENET_NO_MEMORY_CHECK") != "1":
        warnings.warn(f"{what} need at least {readable_size(need)} of the {readable_size(free)} of memory "
                      "available: the process may be stopped for memory; a smaller batch is safer", stacklevel=2)


def readable_size(num_bytes: float) -> str:
    """num_bytes in MiB, GiB, TiB or PiB, whichever keeps the number under 1024 (or EiB beyond)."""
    for power, unit in ((2, "MiB"), (3, "GiB"), (4, "TiB"), (5, "PiB")):
        if num_bytes < 2 ** (10 * (power + 1)):
            return f"{num_bytes / 2 ** (10 * power):.1f} {unit}"
    return f"{num_bytes / 2**60:.1f} EiB"


def check_model_fits(build: Callable[[], nn.Module], copies: int = 1, what: str = "the model's weights") -> None:
    """Run build() on the meta device (no memory) and check that `copies` of the weights it makes fit
    in the machine's memory, when they would be made there (not in the meta build itself, nor under
    `with torch.device("cuda")`); `what` names them in the refusal."""
    if torch.empty(()).device.type != "cpu":  # the meta build itself, or weights made on a GPU
        return
    with torch.device("meta"):
        ghost = build()
    size = parameter_bytes(ghost) + sum(t.numel() * t.element_size() for t in ghost.buffers())
    check_fits_memory(copies * size, f"{what} ({sum(p.numel() for p in ghost.parameters()):,} parameters)")


def parameter_bytes(model: nn.Module) -> int:
    """The bytes of the model's parameters: also what each of their gradients and optimizer moments takes."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
