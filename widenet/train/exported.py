"""Model folders to ship: what `widenet export`, `widenet upcycle` and `widenet import` write.

    DIR/config.json        {"format": "widenet-model", "format_version": 1, "widenet_version": ...,
                            "model": preset name, "kind": "vision" | "text", "model_config": {...},
                            "classes": [...] or null, "image": {"mean": [...], "std": [...]} (vision),
                            "tokenizer": {"fingerprint", "vocab_size"} (text), "source": where it came from}
    DIR/model.safetensors  the weights, under the model's state-dict keys
    DIR/tokenizer.json     text models: the tokenizer the ids were made with

`load_source` reads any starting point a command takes (such a folder, a run
folder, a checkpoint folder, or a Hugging Face checkpoint folder) into the
same shape as a training checkpoint (meta + weights: a Source), so
`--init` and `from_pretrained` treat them alike. config.json carries a
format version: a later widenet reads every earlier version, and a folder
written by a newer one is refused with a line saying so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.text.tokenizer import load_tokenizer, save_tokenizer, vocab_fingerprint
from ..files import fsync_path, raise_if_disk_full
from ..models.hf import is_hf_folder, load_hf
from ..models.text import TextConfig, TextTransformer
from ..models.vision import VisionConfig, VisionTransformer
from .checkpoint import CheckpointError, find_latest_checkpoint, load_checkpoint
from .checkpoint_layout import remove_tree

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "HEADS", "Source", "is_export", "load_model", "load_source",
           "model_from_meta", "read_export", "weights_from", "write_export"]

EXPORT_FORMAT = "widenet-model"
EXPORT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"


@dataclass
class Source:
    """Any starting point read like a training checkpoint (LoadedCheckpoint's fields), with the
    tokenizer file beside it (text models) or None, and notes for the user (e.g. new heads)."""

    path: Path
    step: int
    meta: dict
    model_state: dict[str, torch.Tensor]
    train_state: dict
    tokenizer_path: Path | None = None
    notes: list[str] = field(default_factory=list)


def is_export(path: str | os.PathLike) -> bool:
    config = Path(path) / CONFIG_FILE
    try:
        return config.is_file() and json.loads(config.read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def model_kind(model_config: dict) -> str:
    return "text" if "vocab_size" in model_config else "vision"


def model_from_meta(meta: dict) -> nn.Module:
    """A freshly initialised model of the kind and config that `meta` (checkpoint or export) names."""
    config = meta.get("model_config")
    if not isinstance(config, dict):
        raise CheckpointError("the model's meta data has no model_config")
    try:
        if model_kind(config) == "text":
            model: nn.Module = TextTransformer(TextConfig(**config))
        else:
            model = VisionTransformer(VisionConfig(**config))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the saved model_config does not build a model: {err}") from None
    model.model_name = meta.get("model", "")
    return model


def write_export(out: str | os.PathLike, model: nn.Module, *, model_name: str, classes: list[str] | None = None,
                 image_stats: dict | None = None, tokenizer_file: str | os.PathLike | None = None,
                 source: Any = None, overwrite: bool = False) -> Path:
    """Write `model` as an export folder at `out` (see module doc), atomically: a folder of the same
    name appears whole or not at all. An existing non-empty `out` needs overwrite=True.
    tokenizer_file: a tokenizer.json or BERT vocab.txt, saved in the folder as tokenizer.json."""
    from .. import __version__

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    tokenizer, token_meta = None, None
    if tokenizer_file is not None:
        tokenizer = load_tokenizer(tokenizer_file)
        token_meta = dict(fingerprint=vocab_fingerprint(tokenizer), vocab_size=tokenizer.get_vocab_size())
    config = dict(format=EXPORT_FORMAT, format_version=EXPORT_VERSION, widenet_version=__version__,
                  model=model_name, kind=model_kind(model.cfg.to_dict()), model_config=model.cfg.to_dict(),
                  classes=classes, image=image_stats, tokenizer=token_meta, source=source)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    remove_tree(tmp)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
        for file in tmp.iterdir():
            fsync_path(file)
        if out.exists():
            remove_tree(out)
        os.replace(tmp, out)
        fsync_path(out.parent)
    except OSError as err:
        remove_tree(tmp)
        raise_if_disk_full(err, out)
        raise
    return out


def read_export(path: str | os.PathLike) -> Source:
    """An export folder as a Source (meta in the shape of a training checkpoint's, step 0)."""
    folder = Path(path)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE}: unreadable ({err})") from None
    version = config.get("format_version")
    if not isinstance(version, int) or version > EXPORT_VERSION:
        raise CheckpointError(f"{folder}: format version {version!r} is newer than this widenet reads "
                              f"({EXPORT_VERSION}); upgrade widenet")
    try:
        state = load_file(folder / WEIGHTS_FILE)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: could not read the weights ({err})") from None
    image = config.get("image") or {}
    meta = dict(model=config.get("model", ""), model_config=config.get("model_config"), step=0,
                data=dict(classes=config.get("classes"), **image))
    if config.get("tokenizer"):
        meta["tokenizer"] = config["tokenizer"]
    tokenizer = folder / TOKENIZER_FILE
    return Source(folder, 0, meta, state, {}, tokenizer if tokenizer.is_file() else None)


def load_source(path: str | os.PathLike) -> Source:
    """Any starting point as a Source: an export folder, a Hugging Face checkpoint folder, a run
    folder (its latest checkpoint), a checkpoint folder or a model.safetensors inside one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if is_export(path):
        return read_export(path)
    if is_hf_folder(path):
        imported = load_hf(path)
        model = imported.model
        meta = dict(model=imported.model_name, model_config=model.cfg.to_dict(), step=0,
                    data=dict(classes=imported.classes))
        tokenizer = path / TOKENIZER_FILE if (path / TOKENIZER_FILE).is_file() else path / "vocab.txt"
        return Source(path, 0, meta, model.state_dict(), {}, tokenizer if tokenizer.is_file() else None,
                      list(imported.notes))
    ckpt = load_checkpoint(find_latest_checkpoint(path) or path)
    tokenizer = ckpt.path.parent.parent / TOKENIZER_FILE  # the run folder's
    return Source(ckpt.path, ckpt.step, ckpt.meta, ckpt.model_state, ckpt.train_state,
                  tokenizer if tokenizer.is_file() else None)


def load_model(source: Source) -> nn.Module:
    """The model of `source` with its weights, in eval mode."""
    model = model_from_meta(source.meta)
    try:
        model.load_state_dict(source.model_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{source.path}: the weights do not fit the saved config: "
                              f"{str(err).splitlines()[0]}") from None
    return model.eval()


def weights_from(source: Source, model: nn.Module, skip_heads: bool) -> list[str]:
    """Copy `source`'s weights into `model` (same architecture); with skip_heads, tensors whose shape
    differs in a head (classes) are left as initialised. Returns the keys left out."""
    own = model.state_dict()
    left: list[str] = []
    new = {}
    for key, tensor in source.model_state.items():
        if key not in own:
            continue
        if tuple(own[key].shape) != tuple(tensor.shape):
            if skip_heads and key.split(".")[0] in HEADS:
                left.append(key)
                continue
            raise CheckpointError(f"{source.path}: {key} has shape {tuple(tensor.shape)}, the model needs "
                                  f"{tuple(own[key].shape)}")
        new[key] = tensor
    missing = [k for k in own if k not in new and k not in left]
    if missing:
        raise CheckpointError(f"{source.path}: no weights for {', '.join(missing[:5])}")
    model.load_state_dict(new, strict=False)
    return left


HEADS = ("head", "classifier", "span_head", "sop_head", "mlm_head")
