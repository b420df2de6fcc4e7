"""How `widenet train` runs on several processes (data, fully sharded or expert parallel).

Launched as ``torchrun --nproc_per_node W -m widenet train ...`` (W > 1):

* ``--batch-size`` is the global batch B; W must divide it. Every rank walks
  the same global epoch order (same seed), augments the whole global batch
  with the global RNG (identical on every rank; mixup included) and keeps
  its contiguous slice: rank r takes rows r*B/W .. (r+1)*B/W - 1. An epoch's
  last, partial batch is split as evenly as possible and each rank's loss is
  rescaled so that the gradient is still that of the global-batch mean. So
  the images a run sees, augmentation included, do not depend on W.
* Randomness inside the model (dropout, router noise) comes from a seed of
  (seed, step, rank) instead of the global RNG: ranks draw different masks,
  the global RNG stays the same on every rank, and resuming at the same W
  repeats a run exactly. With dropout and router noise off, dropless (or
  never-full) experts and aux_weight 0, a W-process run matches a one-process
  run up to float rounding. Otherwise MoE capacity and the balance loss are
  per rank (computed on the rank's tokens), which changes results slightly.
* Gradients: DDP averages them (the mean of the ranks' mean losses is the
  global mean). Shared modules (WideNet's one attention and one MoE, used by
  every block) are fine: DDP's hook fires once per parameter, after autograd
  has summed the gradients of every use.
* Logged loss, accuracy and images/s are global (reduced over ranks).
* Rank 0 alone writes metrics.jsonl, log lines and checkpoints; the others
  wait at a barrier after each save. Checkpoints always hold the
  consolidated model and optimizer state in the one-process format, so they
  load at any world size (``--out`` must be a folder every rank can read
  for ``--resume``).
* Evaluation is sharded by whole batches (ParallelContext.evaluation_share), so
  that MoE capacity, which is per call, sees the batches one process sees; the
  sums are all-reduced (every rank gets the global result). Needed anyway when
  the forward itself communicates (FSDP, expert parallel).
* Buffers (the conv stem's BatchNorm statistics) are updated by each rank on
  its own rows; before an evaluation and a save every rank takes rank 0's
  (``ParallelContext.sync_buffers``), which the checkpoint holds.

Modes: "single" (one process), "ddp" (DistributedDataParallel), "fsdp"
(``fully_shard`` on the whole model as one unit: WideNet's shared modules
serve every block, so finer units would gather the same weights once per
block; parameters, gradients and optimizer state are sharded between steps)
and "expert" (every MoE becomes an ExpertParallelMoE holding E / N experts per
rank, N = --expert-parallel dividing W: ranks k*N .. k*N+N-1 form expert group
k, and the W / N groups are data-parallel replicas of each other; DDP for the
other weights; an expert shard's gradient is summed over the ranks holding
the same shard in the other groups, then divided by W to match DDP's
averaging; gradient clipping uses the global norm over all shards).
With LAMB, the trust ratio of an expert shard uses the norms of the whole
expert tensor (summed over the ranks), as in one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..rng import restore_rng_state
from .clip import clip_grad_norm, clip_grad_norm_with_shards
from .env import DistEnv, all_reduce_sum, barrier
from .expert_parallel import (ExpertParallelMoE, consolidated_optimizer_state, consolidated_state_dict,
                              convert_to_expert_parallel, expert_shard_keys, shard_optimizer_state)

__all__ = ["MODES", "ParallelContext", "check_global_batch", "check_last_batch", "on_backend_device", "shard_bounds"]

MODES = ("single", "ddp", "fsdp", "expert")


# ----------------------------------------------------------------------------
# Pure checks and slicing
# ----------------------------------------------------------------------------
def check_global_batch(batch_size: int, world_size: int) -> None:
    """--batch-size is global: every process must get the same share."""
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                         f"number of processes ({world_size})")


def check_last_batch(num_examples: int, batch_size: int, world_size: int, unit: str = "images",
                     way_out: str = "--batch-size or --train-subset") -> None:
    """An epoch's last, partial batch must still give every process at least one example (`unit`: what
    the examples are; `way_out`: the flags that change the batches)."""
    rest = num_examples % batch_size
    if 0 < rest < world_size:
        raise ValueError(f"the last batch of every epoch holds {rest} of {num_examples} {unit}, fewer than the "
                         f"{world_size} processes; change {way_out}")


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n rows (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _step_seed(seed: int, step: int, rank: int) -> int:
    digest = hashlib.blake2b(f"widenet:{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _silent(_line: str) -> None:
    pass


# ----------------------------------------------------------------------------
# The context train() talks to
# ----------------------------------------------------------------------------
class ParallelContext:
    """Everything train() does differently on several processes, behind one small interface.

    In "single" mode every method is the identity (or the one-process
    original), so a one-process run is unchanged.
    """

    def __init__(self, env: DistEnv, mode: str = "single", seed: int = 0,
                 expert_parallel: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown parallel mode {mode!r}; use {', '.join(MODES)}")
        if mode != "single" and not env.distributed:
            raise ValueError(f"parallel mode {mode!r} needs several processes: launch with torchrun")
        self.env = env
        self.mode = mode
        self.seed = seed
        # Processes per expert group (None: all of them).
        self.expert_parallel = (expert_parallel or env.world_size) if mode == "expert" else 1
        self._expert_params: list[nn.Parameter] = []
        self._expert_group = None  # ranks splitting the experts (None: all of them)
        self._replica_group = None  # ranks holding the same expert shard (None: no replicas)

    @classmethod
    def for_run(cls, batch_size: int, seed: int, fsdp: bool = False, expert_parallel: int = 1,
                env: DistEnv | None = None) -> ParallelContext:
        """The context for a run under the current process group (or one process)."""
        env = env or DistEnv.current()
        check_global_batch(batch_size, env.world_size)
        if env.distributed and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"WORLD_SIZE={env.world_size} but torch.distributed is not initialised: call "
                               "widenet.distributed.init_distributed() first (the widenet CLI does)")
        return cls(env, _mode(env, fsdp, expert_parallel), seed, expert_parallel)

    # -- who does what ----------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.mode != "single"

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """Rank 0 logs; the others stay quiet."""
        return log if self.is_main else _silent

    def barrier(self) -> None:
        if self.distributed:
            barrier()

    def check_epoch(self, num_examples: int, batch_size: int, unit: str = "images",
                    way_out: str = "--batch-size or --train-subset") -> None:
        """Every rank must get examples from every batch, the epoch's last one included."""
        if self.distributed:
            check_last_batch(num_examples, batch_size, self.env.world_size, unit, way_out)

    def checks_host_memory(self, device: torch.device) -> bool:
        """Whether the run's tensors on `device` are all this one process's, in this machine's memory:
        where widenet.memory's checks apply (processes sharing a machine each hold a part)."""
        return device.type == "cpu" and not self.distributed

    def device(self, device: torch.device) -> torch.device:
        """cuda -> cuda:LOCAL_RANK on several processes."""
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.env.local_rank)
        return device

    # -- the model --------------------------------------------------------------
    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Wrap a model whose weights are final (fresh, or loaded for --resume) for this mode."""
        if self.mode == "single":
            return model
        if self.mode == "fsdp":
            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:  # public from torch 2.6
                raise ValueError(f"--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                                 f"{torch.__version__}: upgrade it, or train without --fsdp") from None
            return fully_shard(model)
        # Weights the task's loss never reaches (a QA model's pooler) get no gradient, which DDP would wait
        # for at the next step; they are left out of its all-reduce and stay as loaded on every rank.
        keys = list(getattr(model, "untrained_parameters", ()))
        if self.mode == "expert":
            self._make_expert_groups()
            convert_to_expert_parallel(model, self._expert_group)
            shards = expert_shard_keys(model)
            if not shards:
                raise ValueError("--expert-parallel needs a model with MoE layers")
            keys += shards
            self._expert_params = [p for m in model.modules() if isinstance(m, ExpertParallelMoE)
                                   for p in m.experts.parameters()]
        if keys:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, keys)
        # Conv weights with a size-1 dim (1-channel images) get gradients whose strides differ only
        # along that dim; DDP warns although the layout is equivalent.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @staticmethod
    def module(model: nn.Module) -> nn.Module:
        """The model inside a DDP wrapper (FSDP shards in place: the model itself)."""
        return model.module if isinstance(model, DistributedDataParallel) else model

    # -- one training step ----------------------------------------------------------
    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous rows of a global batch (the batch itself on one process)."""
        if not self.distributed:
            return batch
        start, stop = shard_bounds(len(batch), self.env.rank, self.env.world_size)
        return batch[start:stop]

    def evaluation_share(self, count: int) -> tuple[int, int, int]:
        """This rank's share of `count` evaluation batches: a contiguous run [first, stop) of whole
        batches (each one that one process evaluates, so MoE capacity, which is per call, routes alike),
        and the empty passes that follow it, so that every rank makes as many forward passes (FSDP's
        weight gathers and expert parallel's token exchange need every rank in each). One process: all."""
        if not self.distributed:
            return 0, count, 0
        first, stop = shard_bounds(count, self.env.rank, self.env.world_size)
        return first, stop, -(-count // self.env.world_size) - (stop - first)

    def loss_scale(self, local: int, total: int) -> float:
        """Factor on the rank's mean loss so that DDP's average is the global mean (1.0 for even shares)."""
        return local * self.env.world_size / total if self.distributed else 1.0

    def forward_rng(self, step: int, device: torch.device):
        """Context for the forward pass: a per-(seed, step, rank) RNG on several processes."""
        if not self.distributed:
            return contextlib.nullcontext()
        return _seeded_rng(_step_seed(self.seed, step, self.env.rank), device)

    def _make_expert_groups(self) -> None:
        """Expert groups of N consecutive ranks and, across them, groups of the ranks holding the same
        shard. Every rank creates every group, in the same order (new_group is a collective)."""
        n, world = self.expert_parallel, self.env.world_size
        if n == world:  # one expert group: the default one
            return
        for k in range(world // n):
            group = dist.new_group(list(range(k * n, (k + 1) * n)))
            if self.env.rank // n == k:
                self._expert_group = group
        for j in range(n):
            group = dist.new_group(list(range(j, world, n)))
            if self.env.rank % n == j:
                self._replica_group = group

    def after_backward(self) -> None:
        """Expert mode: an expert shard's gradient holds the sum over its expert group's ranks; sum it
        over the replicas too, then divide by W as DDP averages."""
        for p in self._expert_params:
            if p.grad is not None:
                if self._replica_group is not None:
                    dist.all_reduce(p.grad, group=self._replica_group)
                p.grad.div_(self.env.world_size)

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        """Global-norm clipping; the norm (a 0-dim tensor) covers every rank's shard where weights
        are sharded."""
        if self.mode == "expert":
            return clip_grad_norm_with_shards(model, self._expert_params, max_norm, self._expert_group,
                                              on_backend_device)
        if self.mode == "fsdp":
            params = [p for p in model.parameters() if p.grad is not None]
            return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")).full_tensor()
        return clip_grad_norm(model.parameters(), max_norm)

    def reduce_step(self, task: torch.Tensor, aux: torch.Tensor, correct: int, local: int,
                    total: int) -> tuple[float, float, int]:
        """Global (mean task loss, mean aux loss, correct predictions) of a step."""
        if not self.distributed:
            return float(task), float(aux), correct
        sums = torch.tensor([float(task) * local, float(aux), float(correct)], dtype=torch.float64)
        all_reduce_sum(on_backend_device(sums))
        return float(sums[0]) / total, float(sums[1]) / self.env.world_size, int(round(float(sums[2])))

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank. Each rank updates them on its own rows;
        DDP (also around expert parallel's other weights) copies rank 0's only at the start of a training
        forward, FSDP never. Called on every rank before an evaluation (sharded over the ranks) and a save
        (rank 0's): the metrics are then the saved model's, and a resumed run starts from the statistics
        an uninterrupted one continues with."""
        if not self.distributed:
            return
        for buffer in self.module(model).buffers():
            on_backend = on_backend_device(buffer)
            dist.broadcast(on_backend, src=0)
            if on_backend is not buffer:
                buffer.copy_(on_backend)

    # -- checkpoints --------------------------------------------------------------------
    def model_state(self, model: nn.Module) -> nn.Module | dict[str, torch.Tensor]:
        """What save_checkpoint gets: the plain model, or its consolidated state (a collective)."""
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return get_model_state_dict(model, options=_full_state_options())
        if self.mode == "expert":
            return consolidated_state_dict(self.module(model))
        return self.module(model)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state dict in the one-process format (a collective when sharded)."""
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            return _by_index(get_optimizer_state_dict(model, optimizer, options=_full_state_options()))
        if self.mode == "expert":
            return consolidated_optimizer_state(self.module(model), optimizer)
        return optimizer.state_dict()

    def restore_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore the saved global RNG states (rank 0's, the same on every rank).

        On GPUs each rank's own device continues from rank 0's device state, so
        the shared augmentation stream stays identical on every rank.
        """
        restore_rng_state(state)
        if self.distributed and "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.as_tensor(state["cuda"][0]).cpu(), self.env.local_rank)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a one-process-format optimizer state (every rank holds the full dict)."""
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, _by_name(model, optimizer, state),
                                     options=StateDictOptions(full_state_dict=True))
        elif self.mode == "expert":
            optimizer.load_state_dict(shard_optimizer_state(self.module(model), optimizer, state))
        else:
            optimizer.load_state_dict(state)


def _mode(env: DistEnv, fsdp: bool, expert_parallel: int) -> str:
    if fsdp and expert_parallel > 1:
        raise ValueError("--fsdp and --expert-parallel cannot be combined")
    if expert_parallel > 1:
        if env.world_size % expert_parallel:
            raise ValueError(f"--expert-parallel {expert_parallel} must divide the number of processes "
                             f"({env.world_size}): groups of {expert_parallel} processes split the experts")
        return "expert"
    if fsdp:
        if not env.distributed:
            raise ValueError("--fsdp shards the model over several processes: launch with "
                             "torchrun --nproc_per_node N -m widenet train ...")
        return "fsdp"
    return "ddp" if env.distributed else "single"


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on a fresh RNG seeded with `seed`; the global RNG state is restored after."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


def on_backend_device(t: torch.Tensor) -> torch.Tensor:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return t.cuda()
    return t


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _by_index(state: Mapping) -> dict:
    """FSDP's name-keyed optimizer state -> optimizer.state_dict()'s index-keyed format."""
    index: dict[str, int] = {}
    groups = []
    for group in state.get("param_groups", []):
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[name]: v for name, v in state.get("state", {}).items()}, "param_groups": groups}


def _by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping) -> dict:
    """optimizer.state_dict()'s index-keyed format -> names, as set_optimizer_state_dict wants."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[int(i)]: v for i, v in state["state"].items()}, "param_groups": groups}
