"""Whether this machine has the memory for a model: refused up front with one line, not found out
by the kernel's out-of-memory killer (which ends the process without a word once the weights,
each small enough to be granted, together fill the machine)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = ["available_memory", "check_fits_memory", "check_model_fits"]

_CGROUP = Path("/sys/fs/cgroup")


def available_memory() -> int | None:
    """Bytes this process can still take on this machine (Linux: MemAvailable, and the cgroup's
    limit when one is set), or None where that cannot be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((_CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_fits_memory(num_bytes: int, what: str) -> None:
    """MemoryError when num_bytes exceed the memory available (nothing when it is unknown)."""
    free = available_memory()
    if free is not None and num_bytes > free:
        raise MemoryError(f"{what} need {num_bytes / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of "
                          "memory available; choose smaller sizes")


def check_model_fits(build: Callable[[], nn.Module]) -> None:
    """Run build() on the meta device (no memory) and check the weights it makes fit, unless this
    is that meta build itself (or any other, e.g. `widenet params`)."""
    if torch.empty(()).device.type == "meta":
        return
    with torch.device("meta"):
        ghost = build()
    size = sum(t.numel() * t.element_size() for t in (*ghost.parameters(), *ghost.buffers()))
    check_fits_memory(size, f"the model's weights ({sum(p.numel() for p in ghost.parameters()):,} parameters)")
