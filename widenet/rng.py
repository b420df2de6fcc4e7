"""Capture and restore every global RNG (torch CPU and CUDA, numpy, random): what a checkpoint
saves so that a resumed run draws exactly what an uninterrupted one would."""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def _python_rng_state() -> dict:
    """``random.getstate()`` as plain ints/lists."""
    version, internal, gauss_next = random.getstate()
    return {"version": version, "state": list(internal), "gauss_next": gauss_next}


def _numpy_rng_state() -> dict | None:
    """numpy's global (legacy) RNG state as tensors/ints/floats, or None without numpy."""
    try:
        import numpy as np
    except ImportError:
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def capture_rng_state() -> dict[str, Any]:
    """Snapshot torch (CPU and every CUDA device), numpy-global and ``random`` RNG states.

    CUDA states are captured once CUDA is initialized (never initializing it
    here).  The result holds only tensors, ints, floats, strings and lists, so
    it can go into ``train_state`` and survive a ``weights_only`` load.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_rng_state()}
    numpy_state = _numpy_rng_state()
    if numpy_state is not None:
        state["numpy"] = numpy_state
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _restore_cuda(states: list[torch.Tensor]) -> None:
    """Restore per-device CUDA RNG states, warning if the device count changed."""
    if not torch.cuda.is_available():
        warnings.warn("checkpoint has CUDA RNG states but CUDA is not available; skipped them")
        return
    count = torch.cuda.device_count()
    if len(states) != count:
        warnings.warn(f"checkpoint has CUDA RNG states for {len(states)} devices, found {count}")
    for index, device_state in enumerate(states[:count]):
        torch.cuda.set_rng_state(device_state.cpu(), index)


def _restore_numpy(state: Mapping) -> None:
    """Restore numpy's global RNG from :func:`_numpy_rng_state` output."""
    import numpy as np

    keys = np.asarray(torch.as_tensor(state["keys"]).numpy(), dtype=np.uint32)
    np.random.set_state(
        (
            state["bit_generator"],
            keys,
            int(state["pos"]),
            int(state["has_gauss"]),
            float(state["cached_gaussian"]),
        )
    )


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state` (parts present are restored)."""
    known = ("torch", "cuda", "numpy", "python")
    if not isinstance(state, Mapping) or not any(k in state for k in known):
        raise ValueError(f"not an RNG state from capture_rng_state(): expected keys among {known}")
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state:
        _restore_cuda(list(state["cuda"]))
    if "numpy" in state:
        _restore_numpy(state["numpy"])
    if "python" in state:
        py = state["python"]
        gauss = py["gauss_next"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), gauss))

