"""One transformer encoder for WideNet and every baseline of the paper.

WideNet (Xue et al., AAAI 2022): all blocks reuse ONE attention module and
ONE mixture-of-experts layer, while each block keeps its own two LayerNorms:

    for i in range(depth):
        x = x + attention(norm1_i(x))
        x = x + moe(norm2_i(x))

The same class expresses ViT (nothing shared, dense FFN), ViT-MoE (MoE in
some blocks), ALBERT (everything shared, norms too) and the ablations, by
settings of `EncoderConfig`; `norm_position="post"` switches to BERT/ALBERT's
post-LayerNorm blocks (the default is pre-norm, as above). A shared module
is owned once: the encoder keeps
`attention`, `mlps`, `moes` and `norms` as ModuleLists holding one entry when
shared and one per block otherwise, so every weight has one state-dict key.
"""

from __future__ import annotations

import re
import dataclasses
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.attention import Attention
from ..layers.drop_path import block_rates, drop_path
from ..layers.experts import gelu_approximation
from ..layers.masks import resolve_padding_mask
from ..layers.mlp import Mlp
from ..layers.moe import MOE_SETTINGS, MoE, MoEConfig, RoutingStats
from ..settings import SettingTypeError, check_types

_MOE_BLOCKS = re.compile(r"^(none|all|last:[1-9]\d*|every:[1-9]\d*)$")


MAX_DEPTH = 10_000  # far beyond any trained transformer


@dataclass
class EncoderConfig:
    """Sizes and sharing of the encoder.

    moe: the MoE layer's settings (layers.moe.MoEConfig); moe_blocks: which
        blocks use an MoE instead of the dense MLP:
        "none", "all", "last:N" (the last N blocks), "every:N" (blocks
        N-1, 2N-1, ...: every N-th block counting from 1).
    share_attention / share_ffn / share_norms: one module for every block.
        With share_ffn, blocks that use an MoE share one MoE and dense blocks
        share one MLP.
    norm_position: where each block's two LayerNorms sit.
        "pre" (ViT, WideNet vision):  x = x + attn(norm1(x));  x = x + ffn(norm2(x));
            then one final LayerNorm after the last block.
        "post" (BERT, ALBERT):        x = norm1(x + attn(x));  x = norm2(x + ffn(x));
            no final norm (the last block already ends in one), so no extra
            parameters. Per-block / shared norms work the same in both modes.
    """

    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    expert_dim: int | None = None  # expert hidden width (None: mlp_dim)
    moe_blocks: str = "none"
    moe: MoEConfig = field(default_factory=MoEConfig)  # experts, top-k, capacity, noise, losses, kernel
    share_attention: bool = False
    share_ffn: bool = False
    share_norms: bool = False
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth of the last block; 0 for the first, linear in between
    norm_eps: float = 1e-6
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    norm_position: str = "pre"
    activation: str = "gelu"  # of every FFN / expert: "gelu" (exact) or "gelu_tanh" (BERT/ALBERT's gelu_new)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            unknown = sorted(set(self.moe) - set(MOE_SETTINGS), key=str)
            if unknown:
                raise ValueError(f"unknown MoE setting(s) {', '.join(map(repr, unknown))} in moe; known: "
                                 f"{', '.join(MOE_SETTINGS)}")
            self.moe = MoEConfig(**self.moe)
        if not isinstance(self.moe, MoEConfig):
            raise SettingTypeError(f"moe must be a MoEConfig or a dict of its settings, got {self.moe!r}")
        check_types(self)
        for name in ("dim", "depth", "num_heads", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.depth > MAX_DEPTH:  # every block is Python objects: 10**9 of them filled the memory unchecked
            raise ValueError(f"depth must be at most {MAX_DEPTH:,}, got {self.depth:,} (every block is a module of "
                             "its own: 10,000 take seconds to build, 10**9 more memory than any machine has)")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.expert_dim is not None and self.expert_dim < 1:
            raise ValueError(f"expert_dim must be a positive integer, got {self.expert_dim!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide the width dim={self.dim}")
        if not _MOE_BLOCKS.match(self.moe_blocks):
            raise ValueError(f"moe_blocks must be none, all, last:N or every:N, got {self.moe_blocks!r}")
        if self.moe_blocks.startswith("last:") and int(self.moe_blocks[5:]) > self.depth:
            raise ValueError(f"moe_blocks={self.moe_blocks!r} asks for more blocks than depth={self.depth}")
        if _picks_no_block(self.moe_blocks, self.depth):
            raise ValueError(f"moe_blocks={self.moe_blocks!r} picks no block of depth={self.depth} (every:N takes "
                             "every N-th block, so N may be at most the depth)")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        gelu_approximation(self.activation)  # a clear error for an unknown name
        if self.norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {self.norm_position!r}")

    @classmethod
    def from_dict(cls, settings: dict) -> EncoderConfig:
        """An EncoderConfig from a dict, e.g. a checkpoint's; the MoE settings may sit in `moe` or,
        as in checkpoints before MoEConfig existed, among the encoder's own keys."""
        settings = dict(settings)
        blocks, depth = settings.get("moe_blocks"), settings.get("depth", cls.depth)
        if _picks_no_block(blocks, depth):  # saved before this was refused: the dense model it built
            warnings.warn(f"moe_blocks={blocks!r} picks no block of depth={depth}; read as 'none', the dense model "
                          "it built", stacklevel=2)
            settings["moe_blocks"] = "none"
        moe = dict(settings.pop("moe", None) or {})
        moe.update({k: settings.pop(k) for k in MOE_SETTINGS if k in settings})
        return cls(**settings, moe=MoEConfig(**moe))

    def replace(self, **changes) -> EncoderConfig:
        """A copy with `changes` applied; MoE settings may be named directly (top_k=1)."""
        moe = {k: changes.pop(k) for k in MOE_SETTINGS if k in changes}
        if moe:  # on top of a MoEConfig given beside them (moe=...), else the current one
            base = changes.get("moe", self.moe)
            changes["moe"] = dataclasses.replace(MoEConfig(**base) if isinstance(base, dict) else base, **moe)
        return dataclasses.replace(self, **changes)

    @property
    def moe_block_ids(self) -> list[int]:
        """Indices of the blocks whose FFN is an MoE."""
        return moe_block_ids(self.moe_blocks, self.depth)

    @property
    def uses_moe(self) -> bool:
        return self.moe_blocks != "none"

    def to_dict(self) -> dict:
        return asdict(self)


def _picks_no_block(moe_blocks: object, depth: object) -> bool:
    """moe_blocks "every:N" with N beyond the depth: it picks blocks N, 2N, ... (from 1), so none, a dense
    model that asked for MoE. False for anything else (other forms are checked on their own)."""
    return (isinstance(moe_blocks, str) and moe_blocks.startswith("every:") and bool(_MOE_BLOCKS.match(moe_blocks))
            and isinstance(depth, int) and not moe_block_ids(moe_blocks, depth))


def moe_block_ids(moe_blocks: str, depth: int) -> list[int]:
    """Indices of the blocks whose FFN is an MoE, for moe_blocks none, all, last:N or every:N."""
    kind, _, n = moe_blocks.partition(":")
    if kind == "none":
        return []
    if kind == "all":
        return list(range(depth))
    if kind == "last":
        return list(range(depth - int(n), depth))
    return [i for i in range(depth) if (i + 1) % int(n) == 0]


@dataclass
class BlockPlan:
    """Which owned module each block uses (indices into the ModuleLists)."""

    attention: int
    norms: int
    mlp: int | None = None
    moe: int | None = None


@dataclass
class EncoderOutput:
    """hidden: (B, T, D) after the final norm; aux_loss: () summed over MoE calls;
    routing: per block, RoutingStats or None for dense blocks;
    hidden_states: per block output (B, T, D) when asked for, else None."""

    hidden: torch.Tensor
    aux_loss: torch.Tensor
    routing: list[RoutingStats | None] = field(default_factory=list)
    hidden_states: list[torch.Tensor] | None = None


class BlockNorms(nn.Module):
    """The two LayerNorms of one block: of the attention and of the FFN sub-layer
    (before it in pre-norm mode, after its residual sum in post-norm mode)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)


class Encoder(nn.Module):
    """Pre- or post-norm transformer encoder with configurable sharing (see module doc)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.plan = _plan_blocks(cfg)
        n_attn = 1 + max(p.attention for p in self.plan)
        n_norms = 1 + max(p.norms for p in self.plan)
        n_mlp = 1 + max((p.mlp for p in self.plan if p.mlp is not None), default=-1)
        n_moe = 1 + max((p.moe for p in self.plan if p.moe is not None), default=-1)
        self.attention = nn.ModuleList(
            Attention(cfg.dim, cfg.num_heads, cfg.attn_dropout, cfg.dropout) for _ in range(n_attn))
        self.norms = nn.ModuleList(BlockNorms(cfg.dim, cfg.norm_eps) for _ in range(n_norms))
        self.mlps = nn.ModuleList(Mlp(cfg.dim, cfg.mlp_dim, cfg.dropout, cfg.activation) for _ in range(n_mlp))
        self.moes = nn.ModuleList(_make_moe(cfg) for _ in range(n_moe))
        self.drop = nn.Dropout(cfg.dropout)
        self.drop_rates = block_rates(cfg.drop_path, cfg.depth)  # per block
        # Post-norm blocks already end in a LayerNorm: no final norm (and no parameters).
        self.final_norm = (nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.norm_position == "pre"
                           else nn.Identity())

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                return_hidden_states: bool = False, *, keep_mask: torch.Tensor | None = None) -> EncoderOutput:
        """x: (B, T, D) tokens; padding_mask: (B, T) bool, True = padding, or keep_mask (B, T),
        bool or 0/1 numbers, 1 = a real token (layers/masks.py)."""
        if x.ndim != 3 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"encoder expects tokens of shape (B, T, {self.cfg.dim}), got {tuple(x.shape)}")
        padding_mask = resolve_padding_mask(x.shape[:2], padding_mask, keep_mask)
        aux = x.new_zeros((), dtype=torch.float32)
        routing: list[RoutingStats | None] = []
        states: list[torch.Tensor] | None = [] if return_hidden_states else None
        checkpointed = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for plan, rate in zip(self.plan, self.drop_rates):
            if checkpointed:  # keep only block inputs; recompute the rest (same RNG draws) in backward
                x, block_aux, stats = checkpoint(self._block, plan, x, padding_mask, rate, use_reentrant=False)
            else:
                x, block_aux, stats = self._block(plan, x, padding_mask, rate)
            if block_aux is not None:
                aux = aux + block_aux
            routing.append(stats)
            if states is not None:
                states.append(x)
        return EncoderOutput(self.final_norm(x), aux, routing, states)

    def _block(self, plan: BlockPlan, x: torch.Tensor, padding_mask: torch.Tensor | None, drop_rate: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor | None, RoutingStats | None]:
        """One block on x (B, T, D): new x, its aux loss (None for a dense FFN), routing stats.
        Each residual branch is dropped per sample at drop_rate in training (stochastic depth)."""
        norms = self.norms[plan.norms]
        attention = self.attention[plan.attention]

        def branch(y: torch.Tensor) -> torch.Tensor:
            return drop_path(y, drop_rate, self.training)

        if self.cfg.norm_position == "post":
            x = norms.attn_norm(x + branch(attention(x, padding_mask)))
            ffn_out, block_aux, stats = self._ffn(plan, x, padding_mask)
            return norms.ffn_norm(x + branch(self.drop(ffn_out))), block_aux, stats
        x = x + branch(attention(norms.attn_norm(x), padding_mask))
        ffn_out, block_aux, stats = self._ffn(plan, norms.ffn_norm(x), padding_mask)
        return x + branch(self.drop(ffn_out)), block_aux, stats

    def _ffn(self, plan: BlockPlan, h: torch.Tensor, padding_mask: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None, RoutingStats | None]:
        """The block's FFN (MoE or dense MLP) on h (B, T, D): output, aux loss, routing stats."""
        if plan.moe is not None:
            moe_out = self.moes[plan.moe](h, padding_mask)
            return moe_out.output, moe_out.aux_loss, moe_out.stats
        return self.mlps[plan.mlp](h), None, None


def _plan_blocks(cfg: EncoderConfig) -> list[BlockPlan]:
    moe_ids = set(cfg.moe_block_ids)
    plans, n_mlp, n_moe = [], 0, 0
    for i in range(cfg.depth):
        plan = BlockPlan(attention=0 if cfg.share_attention else i, norms=0 if cfg.share_norms else i)
        if i in moe_ids:
            plan.moe = 0 if cfg.share_ffn else n_moe
            n_moe += 1
        else:
            plan.mlp = 0 if cfg.share_ffn else n_mlp
            n_mlp += 1
        plans.append(plan)
    return plans


def _make_moe(cfg: EncoderConfig) -> MoE:
    return MoE(cfg.dim, cfg.expert_dim or cfg.mlp_dim, config=cfg.moe, activation=cfg.activation)
