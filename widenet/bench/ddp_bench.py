"""`widenet bench ddp`: data-parallel scaling efficiency on this machine.

Launches `torchrun --nproc_per_node N` for N = 1 and the asked process count,
each running the same training steps of a preset on random input with a
fixed GLOBAL batch (so N processes each do 1/N of the work), and reports the
global images/s of each and the efficiency

    efficiency = images/s with N processes / (N x images/s with 1 process)

With `--expert-parallel` the N-process run also splits every MoE's experts
across the processes (tokens travel by all_to_all), so the efficiency then
includes that exchange.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..listing import counted
from ..memory import check_fits_memory

_WORKER_BYTES = 220 << 20  # a worker's resident memory once torch is imported (measured with time -v)


class LaunchError(RuntimeError):
    """A torchrun launch failed or hung; the message has its last line."""


@dataclass
class DDPBenchResult:
    model: str
    processes: int
    batch_size: int
    steps: int
    images_per_s_1: float
    images_per_s_n: float
    efficiency: float
    expert_parallel: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int, args: list[str], timeout: float) -> float:
    """Run the worker under torchrun with n processes; its global images/s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "widenet.bench.ddp_bench", *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"the {n}-process benchmark did not finish within {timeout:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise LaunchError(f"the {n}-process benchmark failed: {_failure_line(done.stderr or done.stdout)}")
    return json.loads(lines[-1])["images_per_s"]


def _failure_line(output: str) -> str:
    """The line of a failed launch's output that names the failure: a worker's last exception
    ("ValueError: ...", which torchrun prints as "[rank0]: ValueError: ..."), else torchrun's own,
    else its last line that is not a rule of "=" or "-" (torchrun frames its summary with them)."""
    lines = [re.sub(r"^\[\w+\]:\s*", "", line.strip()) for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", line)]
    errors = [line for line in errors if "ChildFailedError" not in line] or errors  # torchrun's: "a child failed"
    if errors:
        return errors[-1]
    words = [line for line in lines if re.search(r"\w", line)]
    return words[-1] if words else "no output"


def run_ddp_bench(model: str = "widenet_tiny", processes: int = 2, batch_size: int = 64, steps: int = 10,
                  expert_parallel: bool = False, timeout: float = 600.0) -> DDPBenchResult:
    """Global images/s on 1 and on `processes` processes (gloo on CPU, NCCL on GPUs)."""
    if processes < 2:
        raise ValueError(f"--processes must be >= 2 to measure scaling, got {processes}")
    if batch_size % processes:
        raise ValueError(f"--batch-size {batch_size} is the global batch: it must be divisible by {processes}")
    _check_model(model, processes if expert_parallel else None)  # before two torchrun launches
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise ValueError(f"--processes {processes}: this machine has {torch.cuda.device_count()} GPU(s), and each "
                         "process takes one")
    # each worker is a Python process with torch loaded (~220 MiB measured), before its model and data
    check_fits_memory(processes * _WORKER_BYTES, f"--processes {processes}: {processes:,} workers (each a Python "
                      "process with torch loaded)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not torch.cuda.is_available() and processes > cores:
        warnings.warn(f"{processes} processes on {cores} CPU core(s): they take turns on the cores, so the "
                      "efficiency measures that, not the scaling", stacklevel=2)
    args = ["--model", model, "--batch-size", str(batch_size), "--steps", str(steps)]
    one = _launch(1, args, timeout)
    many = _launch(processes, args + (["--expert-parallel"] if expert_parallel else []), timeout)
    return DDPBenchResult(model, processes, batch_size, steps, one, many, many / (processes * one), expert_parallel)


def _check_model(name: str, expert_ranks: int | None = None) -> None:
    """Raise ValueError unless name is a vision preset (the worker trains on random images) and,
    for expert parallelism over expert_ranks processes, has MoE layers whose experts they share."""
    from ..models.registry import get_entry, require_preset_kind

    require_preset_kind(name, "vision", "widenet bench ddp")
    cfg = get_entry(name).make_config()
    if expert_ranks is not None:
        if not cfg.encoder.uses_moe:
            raise ValueError(f"--expert-parallel: {name} has no MoE layers, so there are no experts to split")
        experts = cfg.encoder.moe.num_experts
        if experts % expert_ranks:
            raise ValueError(f"--expert-parallel over {expert_ranks} processes needs a number of experts divisible "
                             f"by {expert_ranks}; {name} has {experts}")


# --- the worker (one per process, under torchrun) -------------------------------------------------
def _worker(argv: list[str]) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from ..distributed.env import destroy_distributed, init_distributed
    from ..distributed.expert_parallel import convert_to_expert_parallel
    from ..models.registry import create_model
    from ..train.update import apply_update

    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--expert-parallel", action="store_true")
    a = p.parse_args(argv)
    env = init_distributed("auto")
    try:
        device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        model = create_model(a.model).to(device).train()
        if env.distributed and a.expert_parallel:
            convert_to_expert_parallel(model)
        net = DistributedDataParallel(model) if env.distributed else model
        cfg = model.cfg
        local = a.batch_size // env.world_size
        images = torch.randn(local, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
        labels = torch.randint(0, cfg.num_classes, (local,), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            out = net(images)
            apply_update(net, opt, F.cross_entropy(out.logits, labels) + 0.01 * out.aux_loss)

        step()  # warm-up (and DDP's first-iteration bucketing)
        _sync(env, device)
        start = time.perf_counter()
        for _ in range(a.steps):
            step()
        _sync(env, device)
        seconds = time.perf_counter() - start
        if env.is_main:
            print(json.dumps(dict(images_per_s=a.batch_size * a.steps / seconds)), flush=True)
    finally:
        destroy_distributed()


def _sync(env, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if env.distributed:
        torch.distributed.barrier()


def format_ddp_bench(r: DDPBenchResult) -> str:
    mode = "data + expert parallel" if r.expert_parallel else "data parallel"
    steps = counted(r.steps, "step")
    return (f"{r.model}, global batch {r.batch_size}, {steps}: 1 process {r.images_per_s_1:.1f} images/s, "
            f"{r.processes} processes ({mode}) {r.images_per_s_n:.1f} images/s -> scaling efficiency "
            f"{100 * r.efficiency:.0f}%")


if __name__ == "__main__":
    from ..distributed.env import exit_without_finalizing

    _worker(sys.argv[1:])
    exit_without_finalizing(0)  # what the CLI does under torchrun (see that function)
