"""widenet models as Hugging Face checkpoint folders that `transformers` loads: the inverse of
hf.py's import, for the models a transformers class computes exactly.

    VisionTransformer: dense, nothing shared, pre-norm, patch stem, class token, no pre-logits layer
        -> ViTForImageClassification (transformers 4's tensor names, which transformers 5 reads too);
        a grey model (one channel) as an RGB one (GREY_AS_RGB), since transformers' pipelines convert
        every image to RGB
    TextTransformer: dense, post-norm, attention, FFN and norms all shared (ALBERT) or none (BERT with
        ALBERT's factorized embedding: an ALBERT with a layer group per block)
        -> AlbertForPreTraining / AlbertForSequenceClassification / AlbertForQuestionAnswering (by task)

Everything else has no transformers class (an MoE, WideNet's per-block norms, pre-norm text
models, the convolutional stem, ...) and is refused by name (HFExportError). The tensors are the
import's mapping run backwards (a q/k/v weight split in three), so importing the folder again gives
the same function (a grey ViT as its RGB form; a QA model without the pooler it does not use).
"""

from __future__ import annotations

import torch
from torch import nn

from .hf_names import albert_names, resolve, vit_names
from .text import TextTransformer
from .vision import VisionTransformer

__all__ = ["GREY_AS_RGB", "HFExportError", "hf_channels", "hf_checkpoint", "hf_export_problem"]

# A grey model's patch weights w become w * (0.299, 0.587, 0.114) over R, G, B (ITU-R 601 luma, what
# Pillow's "L" conversion computes): with the mean and std the same on every channel, the RGB model
# computes on an image what the grey model computes on its grey conversion (exactly on a grey image
# made RGB, as pipelines do; on a colour one at the model's size up to Pillow's rounding to whole grey
# levels; one resized first differs a little more, as the processor resizes before combining).
GREY_AS_RGB = (0.299, 0.587, 0.114)

_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
_ALBERT_ARCH = {"pretrain": "AlbertForPreTraining", "classify": "AlbertForSequenceClassification",
                "qa": "AlbertForQuestionAnswering"}
_HEADS = ("classifier.", "qa_outputs.", "predictions.", "sop_classifier.")  # outside the base model's prefix


class HFExportError(ValueError):
    """A model that no transformers class computes: it cannot be written as a Hugging Face folder."""


def hf_export_problem(model: nn.Module) -> str | None:
    """Why `model` has no Hugging Face equivalent, or None."""
    if not isinstance(model, (VisionTransformer, TextTransformer)):
        return f"a {type(model).__name__} is not a widenet model"
    enc = model.cfg.encoder
    shared = (enc.share_attention, enc.share_ffn, enc.share_norms)
    vision = isinstance(model, VisionTransformer)
    wanted = "ViT" if vision else "ALBERT"
    if enc.moe_blocks != "none":
        return f"it has mixture-of-experts blocks (moe_blocks={enc.moe_blocks}), which {wanted} has not"
    if vision and any(shared):
        return "it shares weights between blocks; ViT gives every block its own"
    if not vision and any(shared) and not all(shared):
        return (f"it shares {_shared_names(shared)} but not all three of attention, FFN and norms: ALBERT shares "
                "all of them, or (a layer group per block) none")
    position = "pre" if vision else "post"
    if enc.norm_position != position:
        hint = "" if vision else " (--set norm_position=post trains one)"
        return f"its blocks are {enc.norm_position}-norm and {wanted}'s {position}-norm{hint}"
    if vision:
        cfg = model.cfg
        for setting, value, want in (("stem", cfg.stem, "patch"), ("pool", cfg.pool, "token")):
            if value != want:
                return f"{setting}={value!r}: ViT has only {setting}={want!r}"
        if cfg.representation_size is not None:
            return "it has a pre-logits layer (representation_size), which ViTForImageClassification has not"
    return None


def hf_channels(model: nn.Module) -> int:
    """The image channels of `model` written as a Hugging Face ViT: 3 for a grey model (GREY_AS_RGB)."""
    return 3 if model.cfg.in_channels == 1 else model.cfg.in_channels


def _shared_names(shared: tuple[bool, bool, bool]) -> str:
    return ", ".join(name for name, on in zip(("attention", "FFN", "norms"), shared) if on)


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    """A weight as written: in float32 whatever the model holds (a bf16 or fp16 one's widened exactly).
    transformers loads a checkpoint in the dtype its file holds (transformers 5's default dtype="auto")
    while widenet reads every weight into float32: a bf16 file would compute in bf16 there and in
    float32 here, apart by far more than float32's rounding."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).contiguous()


def hf_checkpoint(model: nn.Module, classes: list[str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict under Hugging Face's names) of `model`; HFExportError when
    no transformers class computes it (hf_export_problem)."""
    if (problem := hf_export_problem(model)) is not None:
        raise HFExportError(f"no Hugging Face model computes this one: {problem}")
    enc = model.cfg.encoder
    config = dict(hidden_size=enc.dim, num_hidden_layers=enc.depth, num_attention_heads=enc.num_heads,
                  intermediate_size=enc.mlp_dim, hidden_act=_HF_ACTIVATION[enc.activation],
                  hidden_dropout_prob=enc.dropout, attention_probs_dropout_prob=enc.attn_dropout,
                  layer_norm_eps=enc.norm_eps, initializer_range=0.02)
    if isinstance(model, VisionTransformer):
        cfg, prefix = model.cfg, "vit."
        config.update(model_type="vit", architectures=["ViTForImageClassification"], image_size=cfg.image_size,
                      patch_size=cfg.patch_size, num_channels=hf_channels(model), qkv_bias=True)
        mapping, num_labels, drop = vit_names(enc.depth, legacy=True), cfg.num_classes, ()
    else:
        cfg, prefix = model.cfg, "albert."
        groups = 1 if enc.share_attention else enc.depth  # a layer group per block when nothing is shared
        config.update(model_type="albert", architectures=[_ALBERT_ARCH[cfg.task]], vocab_size=cfg.vocab_size,
                      embedding_size=cfg.embedding_size, max_position_embeddings=cfg.max_positions,
                      type_vocab_size=cfg.type_vocab_size, pad_token_id=cfg.pad_token_id, num_hidden_groups=groups,
                      inner_group_num=1, tie_word_embeddings=cfg.tie_word_embeddings,
                      classifier_dropout_prob=enc.dropout)
        mapping, num_labels = albert_names(groups), cfg.num_labels if cfg.task == "classify" else None
        if not cfg.tie_word_embeddings:
            mapping["mlm_head.decoder"] = "predictions.decoder.weight"
        drop = ("backbone.pooler.",) if cfg.task == "qa" else ()  # AlbertForQuestionAnswering has no pooler
    if classes is not None and len(classes) != num_labels:
        raise ValueError(f"{len(classes)} class names for a model with {num_labels or 'no'} classes")
    if num_labels is not None:
        names = classes or [f"LABEL_{i}" for i in range(num_labels)]  # (transformers' own default names)
        config.update(id2label={str(i): name for i, name in enumerate(names)},
                      label2id={name: i for i, name in enumerate(names)})
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(drop):
            continue
        target = resolve(key, mapping)
        if target is None:  # every tensor of an accepted model has a place: a new one needs a mapping
            raise HFExportError(f"no Hugging Face name for widenet's {key}")
        parts = [target] if isinstance(target, str) else target
        for name, part in zip(parts, tensor.chunk(len(parts))):  # q, k, v: the rows of qkv in thirds
            state[name if name.startswith(_HEADS) else prefix + name] = _float32(part)
    patch = "vit.embeddings.patch_embeddings.projection.weight"
    if patch in state and state[patch].shape[1] == 1:  # (D, 1, p, p) -> (D, 3, p, p)
        state[patch] = state[patch] * torch.tensor(GREY_AS_RGB, dtype=state[patch].dtype)[:, None, None]
    if "predictions.bias" in state:
        state["predictions.decoder.bias"] = state["predictions.bias"].clone()  # what the head adds (transformers 5)
    return config, state

