"""Expert parallelism: the experts of an MoE split across the ranks of a process group.

Each of the W ranks holds L = E / W consecutive experts (rank r owns experts
r*L .. r*L+L-1) and a full copy of the router. One call, on every rank:

1. route this rank's tokens exactly as :class:`~widenet.layers.moe.MoE` does
   (same router, same capacity rule on this rank's token count, same
   priority, same dropping, same balance and z losses);
2. exchange the kept counts per expert (a tiny all_to_all of E integers), so
   every rank knows how many rows it will receive from every other rank;
3. send the kept rows to the ranks owning their experts with
   ``all_to_all_single`` and uneven split sizes, run the local experts, and
   send the results back the same way (reversed splits);
4. combine with the gate weights, as MoE does.

Why exchanged split sizes instead of fixed-capacity buffers: only the rows
that are really kept travel (with dropless routing or a generous capacity
factor, fixed buffers of capacity x E rows would mostly carry padding), and
the layer computes exactly what the single-process MoE computes on the same
tokens, dropping included. The price is one extra all_to_all of E integers
and a host sync per call, small next to the token exchange.

Both transfers are differentiable: :class:`_AllToAll`'s backward sends the
gradients back with the split sizes swapped. Every rank must therefore run
forward and backward through the layer the same number of times (as with
DDP); a rank without tokens still takes part with empty buffers.

Axis legend: N tokens on this rank, D width, E experts (all ranks), L local
experts, W ranks, M kept rows sent by this rank, R rows received.

Checkpoints: :func:`consolidated_state_dict` gathers the shards into the
state dict of the plain model (loadable in one process, or at any other
expert-parallel degree), and :func:`load_consolidated_state_dict` takes such
a full state dict and keeps this rank's share.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..layers.moe import MoE, MoEConfig, RoutingStats
from .shards import mark_sharded

__all__ = ["ExpertParallelMoE", "consolidated_state_dict", "convert_to_expert_parallel",
           "expert_shard_keys", "load_consolidated_state_dict", "shard_state_dict"]


# ----------------------------------------------------------------------------
# Differentiable token exchange
# ----------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Rows (S, D) -> (sum(recv_splits), D): split send_splits[d] rows go to rank d.

    Backward sends the gradient rows back with the two split lists swapped.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        send_splits, recv_splits = ctx.splits
        return _all_to_all(grad, recv_splits, send_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty(sum(recv_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation perm; backward puts the rows back (no scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor):
        ctx.save_for_backward(perm)
        return x.index_select(0, perm)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (perm,) = ctx.saved_tensors
        out = torch.empty_like(grad)
        out[perm] = grad
        return out, None


def source_to_expert_order(received: torch.Tensor) -> torch.Tensor:
    """Permutation regrouping received rows from (source, expert) to (expert, source) order.

    received: (W, L) rows received from each source rank for each local
    expert; the rows arrive source-major. Returns perm (R,) with
    rows_by_expert = rows[perm].
    """
    counts = received.reshape(-1)  # (W*L,) source-major
    starts = (counts.cumsum(0) - counts).view_as(received)  # (W, L) where each run begins
    by_expert = received.t().reshape(-1)  # (L*W,) expert-major run lengths
    run_start = starts.t().reshape(-1).repeat_interleave(by_expert)  # (R,)
    offset = torch.arange(int(counts.sum()), device=received.device)
    offset = offset - (by_expert.cumsum(0) - by_expert).repeat_interleave(by_expert)  # (R,) index in run
    return run_start + offset


# ----------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------
class ExpertParallelMoE(MoE):
    """An :class:`MoE` whose experts are split across the ranks of ``group``.

    Built from the MoE's sizes and MoEConfig plus ``group`` (None: the default
    process group, which must be initialised). ``self.experts`` holds only
    this rank's num_experts / world_size experts; ``self.num_experts`` stays
    the total. The output, auxiliary loss and routing statistics of a call
    equal those of the single-process MoE (with the same weights) on this
    rank's tokens. Build it from an existing MoE with :meth:`from_moe`.
    """

    local_experts = False  # rows travel to the ranks that own their experts

    def __init__(self, dim: int, hidden_dim: int, config: MoEConfig, group=None, activation: str = "gelu") -> None:
        world, rank = _group_size_and_rank(group)
        if config.num_experts % world:
            raise ValueError(f"expert parallelism over {world} ranks needs num_experts divisible by {world}, "
                             f"got {config.num_experts}")
        super().__init__(dim, hidden_dim, config=config, activation=activation)
        self.group = group
        self.world = world
        self.rank = rank
        self.num_local_experts = config.num_experts // world
        # Keep this rank's experts only (initialised by the full MoE's rule, then sliced).
        self.experts = _slice_experts(self.experts, self.local_expert_range)
        self._mark_expert_shards()

    @classmethod
    def from_moe(cls, moe: MoE, group=None) -> ExpertParallelMoE:
        """The expert-parallel twin of ``moe``: its router and this rank's share of its experts."""
        if isinstance(moe, ExpertParallelMoE):
            raise TypeError("this MoE is already expert-parallel")
        with torch.device("meta"):  # skip initialising weights that are overwritten below
            ep = cls(moe.dim, moe.experts.w1.shape[-1], moe.cfg, group=group, activation=moe.experts.activation)
        ep.router = moe.router
        ep.experts = _slice_experts(moe.experts, ep.local_expert_range)
        ep._mark_expert_shards()
        ep.train(moe.training)
        return ep

    def _mark_expert_shards(self) -> None:
        """LAMB's trust ratio of an expert tensor must use the norms of the whole tensor, over all ranks."""
        for p in self.experts.parameters():
            mark_sharded(p, self.group)

    @property
    def local_expert_range(self) -> range:
        """Global ids of the experts this rank holds."""
        first = self.rank * self.num_local_experts
        return range(first, first + self.num_local_experts)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", expert_parallel={self.world}, local_experts={self.num_local_experts}"

    def _route_and_compute(self, x: torch.Tensor, valid: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor, RoutingStats]:
        if x.shape[0] > 0:
            return super()._route_and_compute(x, valid)
        # No tokens here, but the other ranks still exchange with this one (forward and backward).
        out = self._run_experts(x, [0] * self.num_experts)  # (0, D)
        return out, 0.0 * self.router.weight.sum(), RoutingStats.empty(self.num_experts, x.device)

    def _run_experts(self, rows: torch.Tensor, per_expert: list[int]) -> torch.Tensor:
        """rows (M, D) grouped by global expert -> expert outputs (M, D), computed where the experts live."""
        w, local = self.world, self.num_local_experts
        sent = torch.tensor(per_expert, dtype=torch.int64, device=rows.device)  # (E,) rows per expert
        received = _all_to_all(sent, [local] * w, [local] * w, self.group).view(w, local)  # (W, L)
        send_splits = sent.view(w, local).sum(1).tolist()  # (W,)
        recv_splits = received.sum(1).tolist()  # (W,)
        incoming = _AllToAll.apply(rows, send_splits, recv_splits, self.group)  # (R, D) source-major
        perm = source_to_expert_order(received)  # (R,)
        y = self.experts(_PermuteRows.apply(incoming, perm), received.sum(0).tolist())  # (R, D) expert-major
        y = _PermuteRows.apply(y, torch.argsort(perm))  # (R, D) source-major again
        return _AllToAll.apply(y, recv_splits, send_splits, self.group)  # (M, D)


def _group_size_and_rank(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs an initialised process group "
                           "(launch with torchrun; see widenet.distributed.init_distributed)")
    return dist.get_world_size(group), dist.get_rank(group)


def _slice_experts(experts: nn.Module, ids: range) -> nn.Module:
    """A new Experts module holding copies of experts ids (a contiguous range)."""
    from ..layers.moe import Experts

    w1 = experts.w1
    with torch.device("meta"):
        local = Experts(len(ids), w1.shape[1], w1.shape[2], experts.backend, experts.activation)
    part = slice(ids.start, ids.stop)
    for name in ("w1", "b1", "w2", "b2"):
        full = getattr(experts, name)
        setattr(local, name, nn.Parameter(full.detach()[part].clone(), requires_grad=full.requires_grad))
    return local


# ----------------------------------------------------------------------------
# Model-level conversion and consolidated checkpoints
# ----------------------------------------------------------------------------
def convert_to_expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Replace every MoE inside ``model`` by its ExpertParallelMoE twin (in place; returned).

    Every rank must call it on an identical model (same seed or same loaded
    weights): each keeps the router and its share of the experts. A shared
    MoE (WideNet) is converted once and stays shared.
    """
    converted: dict[int, ExpertParallelMoE] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE):
                if id(child) not in converted:
                    converted[id(child)] = ExpertParallelMoE.from_moe(child, group)
                setattr(parent, name, converted[id(child)])
    if isinstance(model, MoE) and not isinstance(model, ExpertParallelMoE):
        return ExpertParallelMoE.from_moe(model, group)
    return model


def _expert_layers(model: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    """(state-dict prefix, layer) of every expert-parallel layer, shared ones once."""
    return [(prefix + "." if prefix else "", m) for prefix, m in model.named_modules()
            if isinstance(m, ExpertParallelMoE)]


def expert_shard_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the expert weights held in shards (split along dim 0 across ranks)."""
    return [f"{prefix}experts.{name}" for prefix, m in _expert_layers(model)
            for name in m.experts.state_dict()]


def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's full state dict, expert shards gathered (a collective: call on every rank).

    Every rank gets the full dict; typically rank 0 saves it.
    """
    state = dict(model.state_dict())
    for prefix, layer in _expert_layers(model):
        for name, shard in layer.experts.state_dict().items():
            state[f"{prefix}experts.{name}"] = gather_shards(shard, layer.group)
    return state


def gather_shards(shard: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's equally shaped shard along dim 0 (rank order)."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(parts, shard.detach().contiguous(), group=group)
    return torch.cat(parts, 0)


def shard_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """From a full (consolidated) state dict, the one this rank's model loads: its expert rows only."""
    local = dict(full)
    for prefix, layer in _expert_layers(model):
        ids = layer.local_expert_range
        for name in layer.experts.state_dict():
            key = f"{prefix}experts.{name}"
            if key not in full:
                raise KeyError(f"consolidated state dict has no {key!r}")
            if full[key].shape[0] != layer.num_experts:
                raise ValueError(f"{key} holds {full[key].shape[0]} experts, the model has {layer.num_experts}")
            local[key] = full[key][ids.start:ids.stop]
    return local


def load_consolidated_state_dict(model: nn.Module, full: dict[str, torch.Tensor], strict: bool = True):
    """Load a full state dict (e.g. saved by one process) into an expert-parallel model."""
    return model.load_state_dict(shard_state_dict(model, full), strict=strict)


def _expert_param_indices(model: nn.Module, optimizer: torch.optim.Optimizer
                          ) -> list[tuple[int, ExpertParallelMoE]]:
    """(index in optimizer.state_dict(), layer) of every expert-shard parameter, in index order."""
    index_of = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    found = {index_of[id(p)]: layer for _, layer in _expert_layers(model)
             for p in layer.experts.parameters() if id(p) in index_of}
    return sorted(found.items())


def consolidated_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every expert-shard state tensor gathered (a collective).

    Per-parameter tensors (Adam moments, ...) of expert weights are gathered
    along dim 0; scalars (step counts) are the same on every rank and kept.
    The result is what a one-process run's optimizer would save.
    """
    state = optimizer.state_dict()
    per_param = dict(state["state"])  # copy: the entries are the optimizer's live dicts
    for index, layer in _expert_param_indices(model, optimizer):
        if index in per_param:
            per_param[index] = {k: gather_shards(v, layer.group) if _per_row(v) else v
                                for k, v in per_param[index].items()}
    return {**state, "state": per_param}


def shard_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> dict:
    """From a consolidated optimizer state, the one this rank's optimizer loads (its experts' rows)."""
    per_param = dict(full["state"])
    for index, layer in _expert_param_indices(model, optimizer):
        entry = per_param.get(index)
        if entry is None:
            continue
        ids = layer.local_expert_range
        per_param[index] = {k: v[ids.start:ids.stop] if _per_row(v) else v for k, v in entry.items()}
    return {**full, "state": per_param}


def _per_row(value) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 1
