"""Device selection and mixed precision, shared by training and benchmarks."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")


def describe_device(device: torch.device) -> str:
    """Where a run ran, for a report: the GPU's name, or the CPU's architecture and threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    import platform

    return f"{platform.machine()} CPU with {torch.get_num_threads()} threads (torch {torch.__version__})"


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """'auto' -> bf16 on a CUDA device that supports it, else off; 'bf16'/'fp16'/'off' as said."""
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"amp must be auto, off, bf16 or fp16, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype`, or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class CompileUnavailable(RuntimeError):
    """torch.compile cannot run here; the message names the cause and the way out."""


def compile_model(model: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """torch.compile(model, fullgraph=True) after checking that this installation can compile
    (the compiled module shares model's parameters; compilation happens on the first calls).

    Random ops inside the graph draw from PyTorch's generators exactly as eager
    code does (inductor's fallback_random), so a compiled run consumes the
    same random stream as an eager one and resumes from a checkpoint exactly.
    Raises CompileUnavailable (one line: the cause, and to run without
    --compile) where the torch, Python or platform cannot compile.
    """
    device = device or next(model.parameters()).device
    check_compile_available(device)
    import torch._dynamo

    # The text models' masked-LM head reads the masked positions (a boolean-mask gather, whose
    # row count depends on the data); dynamo captures such ops only when asked.
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(model, fullgraph=True, options={"fallback_random": True})


def compiled_if(enabled: bool, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """compile_model(model) when enabled (a run's --compile), else model itself."""
    return compile_model(model, device) if enabled else model


def check_compile_available(device: torch.device) -> None:
    """Raise CompileUnavailable unless torch.compile's default backend can run on `device`."""
    hint = "; run without --compile"
    try:
        import torch._dynamo as dynamo

        dynamo.is_dynamo_supported()  # raises on Python versions and platforms dynamo lacks
    except Exception as err:  # noqa: BLE001 - any failure here means: no compile
        raise CompileUnavailable(f"torch.compile is unavailable ({first_line(err)}){hint}") from None
    if device.type == "cpu" and not _cpp_compiler_runs():
        raise CompileUnavailable(f"torch.compile on a CPU needs a C++ compiler: {' or '.join(_cpp_compilers())} did "
                                 f"not run (set CXX to use another){hint}")
    elif device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise CompileUnavailable(f"torch.compile on a GPU needs triton, which is not installed{hint}")


def _cpp_compilers() -> list[str]:
    """The C++ compilers inductor tries, in order: its config's (from $CXX, else g++ when it loaded)."""
    import os

    try:
        from torch._inductor import config as inductor_config

        cxx = inductor_config.cpp.cxx
    except Exception:  # noqa: BLE001 - an inductor that does not load: what it would read
        cxx = os.environ.get("CXX") or "g++"
    return [name for name in (cxx if isinstance(cxx, (list, tuple)) else [cxx]) if name] or ["g++"]


def _cpp_compiler_runs() -> bool:
    """Whether one of inductor's compilers answers `--version` (as inductor checks it)."""
    import subprocess

    for name in _cpp_compilers():
        try:
            subprocess.run([name, "--version"], capture_output=True, check=True, timeout=30)
            return True
        except (OSError, subprocess.SubprocessError):
            continue
    return False


def first_line(err: BaseException) -> str:
    """An error's message in one line (its first), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
