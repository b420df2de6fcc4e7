"""Hugging Face checkpoints from a local folder into widenet's models, exactly.

A folder with ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin``, read with
``weights_only=True``: a pickle that would run code is refused) becomes:

    model_type "albert"  -> TextTransformer, everything shared, post-norm (ALBERT); with a layer
                            group per block (num_hidden_groups = num_hidden_layers), nothing shared
    model_type "bert"    -> TextTransformer, nothing shared, post-norm, embedding
                            size = width with an identity projection (BERT has none)
    model_type "vit"     -> VisionTransformer, patch stem, class token, pre-norm

The head follows the architecture: *ForPreTraining / *ForMaskedLM -> task "pretrain" (BERT's
next-sentence head becomes the sentence-order head, the same shape: (B, D) -> 2);
*ForSequenceClassification -> "classify"; *ForQuestionAnswering -> "qa"; ViTForImageClassification
-> its classifier; a bare *Model keeps the backbone and gets freshly initialised heads. ViTModel's
pooler (Linear + tanh on the class token) becomes the pre-logits layer.

The results equal `transformers`' own models on the same input (tests build small random ones
with save_pretrained). Unknown settings that change the function (grouped ALBERT layers, relative
positions, other activations) are refused by name, as are missing tensors and shape mismatches.
"""

from __future__ import annotations

import json
import pickle as pickle_module
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..files import RefusedPickle, load_safetensors, load_weights_only
from ..listing import listed
from .encoder import EncoderConfig
from .hf_labels import classifier_problem, label_names
from .hf_names import albert_names, bert_names, resolve, vit_names
from .presets import ALBERT_SHARING
from .text import TextConfig, TextTransformer
from .vision import VisionConfig, VisionTransformer

__all__ = ["HFCheckpointError", "HFImport", "SUPPORTED", "is_hf_folder", "load_hf", "nonfinite_tensor",
           "read_hf_folder"]

SUPPORTED = ("albert", "bert", "vit")
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# What transformers' ViTConfig, AlbertConfig and BertConfig fill in for a setting config.json leaves
# out (tests/test_hf.py compares them with those classes): ALBERT's activation is the tanh GELU and
# its embedding 128 wide whatever the width, so a config without them is not BERT's.
_COMMON = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               hidden_act="gelu", layer_norm_eps=1e-12, num_labels=2)
_TEXT = dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)
_DEFAULTS = {
    "vit": {**_COMMON, "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": True},
    "bert": {**_COMMON, **_TEXT},
    "albert": {**_COMMON, **_TEXT, "vocab_size": 30000, "embedding_size": 128, "hidden_size": 4096,
               "num_attention_heads": 64, "intermediate_size": 16384, "hidden_act": "gelu_new",
               "num_hidden_groups": 1, "inner_group_num": 1},
}
_TEXT_TASKS = {"ForPreTraining": "pretrain", "ForMaskedLM": "pretrain", "ForSequenceClassification": "classify",
               "ForQuestionAnswering": "qa"}


class HFCheckpointError(ValueError):
    """A folder that is not a Hugging Face checkpoint widenet can map, or whose tensors do not fit."""


@dataclass
class HFImport:
    """What load_hf returns: the model (eval mode), its preset, kind, class names, notes (new heads)."""

    model: nn.Module
    model_name: str
    kind: str
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    untrained_head: str | None = None  # the task head held no weights ("the classifier"): it predicts nothing


def is_hf_folder(path: str | Path) -> bool:
    """A folder with a config.json that names a model_type (a Hugging Face checkpoint)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def read_hf_folder(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict in float32) of a Hugging Face checkpoint folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise HFCheckpointError(f"{folder}: not a folder (a Hugging Face checkpoint is a folder with config.json "
                                "and model.safetensors)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise HFCheckpointError(f"{folder}: no config.json, so not a Hugging Face checkpoint") from None
    except (OSError, ValueError) as err:
        raise HFCheckpointError(f"{folder / 'config.json'}: unreadable ({err})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise HFCheckpointError(f"{folder / 'config.json'}: no model_type, so not a Hugging Face model config")
    state = _read_weights(folder)
    return config, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single, index, pickle = (folder / "model.safetensors", folder / "model.safetensors.index.json",
                             folder / "pytorch_model.bin")
    try:
        if single.is_file():
            return load_safetensors(single)
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFCheckpointError(f"{index}: no weight_map of tensor names to files")
            shards = sorted(set(map(str, weight_map.values())))
            outside = [s for s in shards if not (folder / s).resolve().is_relative_to(folder.resolve())]
            if outside:  # a checkpoint is its folder: an index naming other files is damaged, or hostile
                raise HFCheckpointError(f"{index}: shard {outside[0]!r} lies outside the checkpoint's folder")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_safetensors(folder / shard))
            return state
        if pickle.is_file():
            state = load_weights_only(pickle)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise HFCheckpointError(f"{pickle}: not a state dict of tensors")
            return state
    except RefusedPickle as err:
        raise HFCheckpointError(str(err)) from None
    except pickle_module.UnpicklingError:
        raise HFCheckpointError(f"{pickle}: refused: not a plain tensor file (widenet reads .bin files with "
                                "weights_only=True and never runs their code); convert it to safetensors") from None
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, AttributeError, TypeError) as err:
        if isinstance(err, HFCheckpointError):
            raise
        raise HFCheckpointError(f"{folder}: could not read the weights ({str(err).splitlines()[0]})") from None
    sharded_bin = " (sharded pytorch_model-*.bin files are not read: convert them to safetensors)" \
        if (folder / "pytorch_model.bin.index.json").is_file() else ""
    raise HFCheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
                            + sharded_bin)


def load_hf(path: str | Path) -> HFImport:
    """The widenet model equal to the Hugging Face checkpoint in folder `path` (see module doc)."""
    config, state = read_hf_folder(path)
    kind = config["model_type"]
    if kind not in SUPPORTED:
        raise HFCheckpointError(f"{path}: model_type {kind!r} is not supported; widenet maps "
                                f"{', '.join(SUPPORTED)} (ALBERT, BERT, ViT)")
    config = {**_DEFAULTS[kind], **config}
    state = _strip_base_prefix(state, kind)
    if (bad := nonfinite_tensor(state)) is not None:
        raise HFCheckpointError(f"{path}: tensor {bad} holds NaN or infinite values")
    arch = _architecture(path, config, kind)
    for name in ("is_decoder", "add_cross_attention"):
        if config.get(name):
            raise HFCheckpointError(f"{path}: {name}=true is not supported (widenet's encoders attend both ways)")
    try:
        if kind == "vit":
            return _load_vit(path, config, state, arch)
        return _load_text(path, config, state, arch, kind)
    except KeyError as err:
        raise HFCheckpointError(f"{path}: config.json lacks {err}") from None
    except (TypeError, ValueError, AttributeError) as err:
        if isinstance(err, HFCheckpointError):
            raise
        raise HFCheckpointError(f"{path}: config.json does not describe a model widenet can build "
                                f"({str(err).splitlines()[0]})") from None


def nonfinite_tensor(state: dict[str, torch.Tensor]) -> str | None:
    """The key of the first floating tensor holding NaN or infinity, or None."""
    return next((key for key, tensor in state.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)


def _architecture(path, config: dict, kind: str) -> str:
    archs = config.get("architectures") or [f"{kind.capitalize()}Model"]
    archs = [archs] if isinstance(archs, str) else archs
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise HFCheckpointError(f"{path}: config.json 'architectures' must be a list of class names, got {archs!r}")
    return archs[0]


# ----------------------------------------------------------------------------
# Text: ALBERT and BERT
# ----------------------------------------------------------------------------
def _text_task(arch: str, state: dict) -> tuple[str, list[str]]:
    for suffix, task in _TEXT_TASKS.items():
        if arch.endswith(suffix):
            return task, []
    has_heads = any(k.startswith(("predictions.", "cls.")) for k in state)
    return "pretrain", [] if has_heads else [f"{arch} has no heads: the masked-LM and sentence-order heads are new"]


def _load_text(path, config: dict, state: dict, arch: str, kind: str) -> HFImport:
    _check_text_settings(path, config, kind)
    task, notes = _text_task(arch, state)
    dim = config["hidden_size"]
    encoder = dict(dim=dim, depth=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                   mlp_dim=config["intermediate_size"], norm_position="post",
                   norm_eps=float(config["layer_norm_eps"]), activation=_activation(path, config),
                   dropout=0.0, attn_dropout=0.0)
    groups = config["num_hidden_groups"] if kind == "albert" else 0
    if groups == 1:  # one ALBERT layer for every block; a group per block shares nothing
        encoder.update(ALBERT_SHARING)
    classes, label_notes = label_names(config) if task == "classify" else (None, [])
    if task == "classify":
        _check_classifier(path, config, classes, state)
    head = {"classify": ("classifier.", "classifier"), "qa": ("qa_outputs.", "span head")}.get(task, ("", ""))
    notes += (missing := _missing_head(path, arch, state, *head))
    decoder = next((k for k in ("predictions.decoder.weight", "cls.predictions.decoder.weight") if k in state), None)
    words = state.get("embeddings.word_embeddings.weight")
    untied = decoder is not None and words is not None and not torch.equal(state[decoder], words)
    cfg = TextConfig(vocab_size=config["vocab_size"],
                     embedding_size=config["embedding_size"] if kind == "albert" else dim,
                     max_positions=config["max_position_embeddings"],
                     type_vocab_size=config["type_vocab_size"], pad_token_id=config["pad_token_id"] or 0,
                     task=task, num_labels=len(classes) if classes else config["num_labels"],
                     encoder=EncoderConfig.from_dict(encoder), tie_word_embeddings=not untied)
    model = TextTransformer(cfg)
    ours = albert_names(groups) if kind == "albert" else bert_names(cfg.encoder.depth)
    if kind == "bert":  # BERT embeds at the full width: the projection is the identity
        state["__identity__.weight"], state["__identity__.bias"] = torch.eye(dim), torch.zeros(dim)
    if untied:  # tie_word_embeddings=False: the head keeps its own decoder
        ours["mlm_head.decoder"] = decoder
    elif decoder is not None:
        del state[decoder]  # the word-embedding table itself
    for bias in ("predictions.bias", "cls.predictions.bias"):  # the output bias the head adds: the decoder's
        decoder_bias = bias.replace(".bias", ".decoder.bias")  # (one tensor in transformers 4; apart in 5, untied)
        if decoder_bias in state:
            state[bias] = state.pop(decoder_bias)
    _copy_into(path, model, state, ours, optional=_new_heads(task, state))
    return HFImport(model.eval(), f"hf-{kind}", "text", classes, notes + label_notes + _head_notes(model, state, task),
                    f"the {head[1]}" if missing else None)


def _check_text_settings(path, config: dict, kind: str) -> None:
    position = config.get("position_embedding_type", "absolute")  # (older transformers wrote it)
    if position != "absolute":
        raise HFCheckpointError(f"{path}: position_embedding_type {position!r} is not supported (only 'absolute')")
    if kind == "albert":
        groups, inner = config["num_hidden_groups"], config["inner_group_num"]
        if inner != 1 or groups not in (1, config["num_hidden_layers"]):
            raise HFCheckpointError(f"{path}: ALBERT with num_hidden_groups={groups} and inner_group_num={inner} is "
                                    "not supported: widenet reads one layer shared by all blocks (both 1) or a layer "
                                    "per block (num_hidden_groups = num_hidden_layers, inner_group_num = 1)")


def _new_heads(task: str, state: dict) -> tuple[str, ...]:
    """Our keys that may stay freshly initialised: heads the checkpoint does not hold."""
    if task == "qa":  # a QA model has no pooler (it reads every token, not [CLS])
        return ("classifier.", "span_head.", "backbone.pooler.")
    if task != "pretrain":
        return ("classifier.", "span_head.")
    heads = ("mlm_head.", "sop_head.", "backbone.pooler.")  # *ForMaskedLM saves no pooler
    return tuple(h for h, hf in zip(heads, (("predictions.", "cls.predictions."),
                                            ("sop_classifier.", "cls.seq_relationship."), ("pooler.",)))
                 if not any(k.startswith(hf) for k in state))


def _head_notes(model: nn.Module, state: dict, task: str) -> list[str]:
    if task != "pretrain":
        return []
    if not any(k.startswith("pooler.") for k in state):
        return ["the checkpoint has no pooler: the pooler and sentence-order head are new"]
    if any(k.startswith("cls.seq_relationship.") for k in state):
        return ["BERT's next-sentence head is loaded as the sentence-order head (same shape, other task)"]
    return []


# ----------------------------------------------------------------------------
# Vision: ViT
# ----------------------------------------------------------------------------
def _load_vit(path, config: dict, state: dict, arch: str) -> HFImport:
    dim = config["hidden_size"]
    classifier = "classifier.weight" in state
    classes, notes = label_names(config) if classifier or config.get("id2label") else (None, [])
    pooled = "pooler.dense.weight" in state
    if pooled and config.get("pooler_act", "tanh") != "tanh":
        raise HFCheckpointError(f"{path}: pooler_act {config['pooler_act']!r} is not supported (widenet's pre-logits "
                                "layer uses tanh)")
    encoder = EncoderConfig(dim=dim, depth=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                            mlp_dim=config["intermediate_size"], norm_eps=float(config["layer_norm_eps"]),
                            activation=_activation(path, config), norm_position="pre")
    num_classes = state["classifier.weight"].shape[0] if classifier else len(classes) if classes else \
        config["num_labels"] or 2
    if classifier:
        _check_classifier(path, config, classes, state)
    cfg = VisionConfig(image_size=_single(path, config, "image_size"), patch_size=_single(path, config, "patch_size"),
                       in_channels=config["num_channels"], num_classes=num_classes, pool="token",
                       stem="patch", representation_size=dim if pooled else None, encoder=encoder)
    model = VisionTransformer(cfg)
    if not config["qkv_bias"]:  # ViT without q/k/v biases: ours are zero
        for key in [k for k in state if re.search(r"(query|key|value|[qkv]_proj)\.weight$", k)]:
            state.setdefault(key[:-len("weight")] + "bias", torch.zeros(dim))
    keys = vit_names(cfg.encoder.depth, legacy=any(".attention.attention.query." in k for k in state))
    _copy_into(path, model, state, keys, optional=() if classifier else ("head.",))
    if not classifier:
        notes.append(f"{arch} has no classifier: the head ({num_classes} classes) is new")
    return HFImport(model.eval(), "hf-vit", "vision", classes, notes, None if classifier else "the classifier")


def _single(path, config: dict, name: str) -> int:
    value = config.get(name)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise HFCheckpointError(f"{path}: {name} {value} is not square; widenet's ViT takes square images")
        value = value[0]
    if not isinstance(value, int):
        raise HFCheckpointError(f"{path}: config.json has no integer {name}")
    return value


# ----------------------------------------------------------------------------
# Shared
# ----------------------------------------------------------------------------
def _activation(path, config: dict) -> str:
    act = config["hidden_act"]
    if act not in _ACTIVATIONS:
        raise HFCheckpointError(f"{path}: hidden_act {act!r} is not supported (widenet has "
                                f"{', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[act]


def _missing_head(path, arch: str, state: dict, prefix: str, what: str) -> list[str]:
    """A note when the task head named by the architecture has no weights in the checkpoint (it is then
    new and untrained: its outputs mean nothing until fine-tuned); HFCheckpointError when only part of it."""
    if not prefix:
        return []
    held = sorted(k for k in state if k.startswith(prefix))
    if held and held != [prefix + "bias", prefix + "weight"]:
        raise HFCheckpointError(f"{path}: the {what} is incomplete ({', '.join(held) or 'nothing'} of {prefix}weight "
                                f"and {prefix}bias); the weights file is damaged or was edited")
    return [] if held else [f"{arch}'s weights hold no {what} ({prefix}*): the head is new and untrained, its "
                            "outputs mean nothing until it is fine-tuned"]


def _check_classifier(path, config: dict, classes: list[str] | None, state: dict) -> None:
    rows = state["classifier.weight"].shape[0] if "classifier.weight" in state else \
        len(classes) if classes else config["num_labels"]
    if problem := classifier_problem(config, classes, rows):
        raise HFCheckpointError(f"{path}: {problem}")


def _strip_base_prefix(state: dict, kind: str) -> dict:
    """Keys without the base model's prefix ('albert.', 'bert.', 'vit.'), as a bare *Model saves them."""
    prefix = kind + "."
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _copy_into(path, model: nn.Module, state: dict, mapping: dict[str, str | list[str]],
               optional: tuple[str, ...] = ()) -> None:
    """Fill every tensor of `model` from `state` through `mapping` (prefixes: "x." maps every
    "x.weight"/"x.bias"; a list concatenates rows). Every tensor of the model must be found unless
    its key starts with an `optional` prefix; shapes must agree (the error names the tensor)."""
    own = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    used: set[str] = {"__identity__.weight", "__identity__.bias"}
    for key, target in own.items():
        source = resolve(key, mapping)
        if source is None:
            continue
        parts = [source] if isinstance(source, str) else source
        if not all(p in state for p in parts):
            if key.startswith(optional):
                continue
            missing = next(p for p in parts if p not in state)
            raise HFCheckpointError(f"{path}: the checkpoint lacks {missing} (needed for {key})")
        tensor = torch.cat([state[p] for p in parts]) if len(parts) > 1 else state[parts[0]]
        if tuple(tensor.shape) != tuple(target.shape):
            raise HFCheckpointError(f"{path}: {' + '.join(parts)} has shape {tuple(tensor.shape)}, "
                                    f"widenet's {key} needs {tuple(target.shape)}")
        new[key] = tensor
        used.update(parts)
    unmapped = [k for k in own if k not in new and not k.startswith(optional)]
    if unmapped:
        raise HFCheckpointError(f"{path}: no checkpoint tensor for {listed(unmapped)}")
    unused = sorted(k for k in set(state) - used if not k.endswith(_BUFFERS))
    if unused:
        raise HFCheckpointError(f"{path}: the checkpoint holds tensors widenet would not use ({listed(unused)}): "
                                "does config.json match the weights?")
    model.load_state_dict(new, strict=False)


_BUFFERS = ("position_ids", "token_type_ids")  # buffers some checkpoints carry: not weights
