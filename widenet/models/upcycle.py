"""Sparse upcycling (Komatsuzaki et al., ICLR 2023): a dense model's weights start a WideNet.

The source is any dense widenet model (TextTransformer or VisionTransformer
without an MoE), e.g. one loaded from a Hugging Face ALBERT, BERT or ViT
checkpoint (models/hf.py) or a finished run. The result has the same
embeddings, stem and heads, and WideNet's encoder: one shared attention, one
shared MoE of E experts (width = the source's FFN width), and each block's
own two LayerNorms. Where its weights come from:

    attention     shared in the source (ALBERT): copied. One per block (ViT,
                  BERT): attention="mean" averages the blocks' projections,
                  attention="block:N" takes block N's (0-based).
    experts       expert e is a copy of an FFN: ALBERT's one shared FFN for
                  every expert; with one FFN per block, expert e takes block
                  round(e * (depth - 1) / (E - 1)) (evenly spaced, the first
                  and the last included; E = 1 takes the middle block, depth // 2;
                  E > depth cycles through the blocks).
                  noise > 0 adds noise * std(W) * N(0, 1) to each copy's
                  weight matrices, so that identical experts can part ways.
    LayerNorms    block i keeps the source's block i norms (ALBERT's shared
                  norms copied into every block); the final norm is kept.
    router        normal(0, 1/sqrt(D)) from `seed`, widenet's usual init: with
                  equal experts the choice does not change the output, and the
                  balance loss spreads the tokens from the first step.

MoE settings: top_k (default 2) and renormalize (default True, so that the K
combine weights sum to one; renormalize=False keeps the raw softmax weights);
the rest are the source's MoE settings (MoEConfig's defaults) unless given. With all
experts equal (noise 0) and no assignment dropped (dropless=True or a large
capacity factor), the upcycled ALBERT computes exactly the source's function
(the test checks it). A ViT or BERT upcycled with attention="mean" does not:
averaged attention is a new function that fine-tuning has to adapt.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..layers.moe import MoEConfig
from ..listing import counted
from ..memory import check_model_fits
from .presets import WIDENET_SHARING
from .text import TextTransformer
from .vision import VisionTransformer

__all__ = ["UpcycleError", "upcycle", "upcycled_config"]


class UpcycleError(ValueError):
    """The source model cannot be upcycled as asked (already an MoE, bad block index...)."""


def upcycled_config(cfg, num_experts: int, top_k: int = 2, **moe_settings):
    """The config of the WideNet that upcycles a model with config `cfg` (Text/VisionConfig)."""
    enc = cfg.encoder
    if enc.uses_moe:
        raise UpcycleError(f"the source model already has an MoE (moe_blocks={enc.moe_blocks!r}); "
                           "upcycling starts from a dense model")
    moe = MoEConfig(**{**dataclasses.asdict(enc.moe), "renormalize": True, **moe_settings,
                       "num_experts": num_experts, "top_k": top_k})
    # The experts are copies of the dense FFNs, mlp_dim wide: a dense model's expert_dim (a preset's
    # setting for its MoE variant, e.g. vit_moe_b16 with moe_blocks=none) describes nothing it has.
    encoder = dataclasses.replace(enc, **WIDENET_SHARING, expert_dim=enc.mlp_dim, moe=moe)
    return dataclasses.replace(cfg, encoder=encoder)


MAX_NOISE = 1.0  # noise is relative to the weights' std: past 1 the copies are mostly noise


def upcycle(source: nn.Module, num_experts: int, top_k: int = 2, *, attention: str = "mean",
            noise: float = 0.0, seed: int = 0, **moe_settings) -> nn.Module:
    """A WideNet (same class as `source`) started from the dense `source`'s weights (module doc)."""
    if not isinstance(source, (TextTransformer, VisionTransformer)):
        raise UpcycleError(f"upcycling takes a widenet TextTransformer or VisionTransformer, "
                           f"got {type(source).__name__}")
    if isinstance(noise, bool) or not (isinstance(noise, (int, float)) and 0 <= noise <= MAX_NOISE):
        raise UpcycleError(f"noise must be a number from 0 to {MAX_NOISE} (a multiple of the weights' std; above "
                           f"it an expert is more noise than copy), got {noise!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not isinstance(attention, str):
        raise UpcycleError(f"seed must be an integer and attention a string, got {seed!r} and {attention!r}")
    cfg = upcycled_config(source.cfg, num_experts, top_k, **moe_settings)
    check_model_fits(lambda: type(source)(cfg), copies=2,
                     what=f"upcycling to {counted(num_experts, 'expert')}: the new model and the copies of its "
                          "weights it starts from")
    target = type(source)(cfg)
    gen = torch.Generator().manual_seed(seed)
    src_enc, enc = source.cfg.encoder, cfg.encoder
    src_state = source.state_dict()
    state = {k: v for k, v in src_state.items() if _outside_blocks(k)}  # embeddings, stem, heads, final norm
    prefix = _encoder_prefix(source)
    own = source.get_submodule(prefix.rstrip("."))
    state.update(_attention_weights(own, prefix, attention))
    for i in range(enc.depth):  # every block its own norms
        norms = own.norms[own.plan[i].norms]
        for name, tensor in norms.state_dict().items():
            state[f"{prefix}norms.{i}.{name}"] = tensor.clone()
    state.update(_expert_weights(own, prefix, num_experts, noise, gen))
    router = target.get_submodule(prefix + "moes.0.router")
    state[prefix + "moes.0.router.weight"] = torch.randn(router.weight.shape, generator=gen) * src_enc.dim ** -0.5
    missing = set(target.state_dict()) - set(state)
    if missing:  # a bug, not bad input: every tensor of the target must have a source
        raise AssertionError(f"upcycle left tensors without a source: {sorted(missing)}")
    target.load_state_dict(state, strict=True)
    target.train(source.training)
    return target


def _encoder_prefix(model: nn.Module) -> str:
    return "backbone.encoder." if isinstance(model, TextTransformer) else "encoder."


def _outside_blocks(key: str) -> bool:
    return not any(f"encoder.{part}." in key for part in ("attention", "norms", "mlps", "moes"))


def _attention_weights(encoder: nn.Module, prefix: str, how: str) -> dict[str, torch.Tensor]:
    """The shared attention's tensors: the mean of the source's attentions ("mean"), or the one
    block N uses ("block:N"; in a source with one shared attention, that one)."""
    modules, depth = list(encoder.attention), len(encoder.plan)
    if how == "mean":
        chosen = modules
    elif how.startswith("block:") and how[6:].isdigit() and int(how[6:]) < depth:
        chosen = [modules[encoder.plan[int(how[6:])].attention]]
    else:
        raise UpcycleError(f"attention must be 'mean' or 'block:N' with N in 0..{depth - 1}, got {how!r}")
    states = [m.state_dict() for m in chosen]
    return {f"{prefix}attention.0.{k}": torch.stack([s[k] for s in states]).mean(0) for k in states[0]}


def _expert_weights(encoder: nn.Module, prefix: str, num_experts: int, noise: float,
                    gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Stacked expert tensors w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D) copied from the FFNs."""
    mlps = list(encoder.mlps)
    depth = len(mlps)
    if depth == 1:
        picks = [0] * num_experts
    elif num_experts == 1:
        picks = [depth // 2]
    elif num_experts <= depth:
        picks = [round(e * (depth - 1) / (num_experts - 1)) for e in range(num_experts)]
    else:
        picks = [e % depth for e in range(num_experts)]
    w1 = torch.stack([mlps[i].fc1.weight.detach().t() for i in picks])
    w2 = torch.stack([mlps[i].fc2.weight.detach().t() for i in picks])
    if noise:
        w1 = w1 + noise * w1.std() * torch.randn(w1.shape, generator=gen).to(w1)  # drawn on the CPU: reproducible
        w2 = w2 + noise * w2.std() * torch.randn(w2.shape, generator=gen).to(w2)
    experts = prefix + "moes.0.experts."
    return {experts + "w1": w1.contiguous(), experts + "b1": torch.stack([mlps[i].fc1.bias.detach() for i in picks]),
            experts + "w2": w2.contiguous(), experts + "b2": torch.stack([mlps[i].fc2.bias.detach() for i in picks])}
