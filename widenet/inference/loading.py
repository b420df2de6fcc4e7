"""Any saved model, ready for inference: `widenet.from_pretrained` and `load_pretrained`; and the
other way, `widenet.save_pretrained` (a widenet folder, or a Hugging Face one).

A path may be an export folder (`widenet export` / `widenet upcycle` /
`widenet import`), a run folder (its latest checkpoint), a checkpoint
folder, or a Hugging Face checkpoint folder (ALBERT, BERT, ViT). See
widenet.train.exported for the formats.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..data.text.tokenizer import TokenizerError
from ..models.text import TextTransformer
from ..models.vision import VisionTransformer
from ..train.exported import (is_model_folder, load_model, load_source, model_kind, read_unswapped, source_tokenizer,
                              write_export)

__all__ = ["Pretrained", "from_pretrained", "load_pretrained", "save_pretrained"]


@dataclass
class Pretrained:
    """A loaded model (eval mode, on the CPU) and what using it needs.

    kind: "vision" or "text".   classes: class names (image classifiers and
    text classifiers; None when unknown).   mean / std: the per-channel
    statistics training normalised images with (vision).   tokenizer: a
    `tokenizers.Tokenizer` (text models whose tokenizer was saved beside them);
    tokenizer_problem: why the one beside the model was not loaded (unreadable, or not the
    model's own vocabulary).   inputs: how fine-tuning prepared the texts (a fine-tuned text
    model; widenet.train.text_inputs), which prediction reuses; None when unknown.
    untrained_head: the task head the checkpoint held no weights for (random), else None.
    resize: how images reach the model's size when not as widenet's training does
    (data.images.folder.decode_image's crop and resample; a Hugging Face ViT's), else None.
    """

    model: nn.Module
    model_name: str
    kind: str
    source: Path
    classes: list[str] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)
    tokenizer_problem: str | None = None  # why the tokenizer beside the model was not loaded
    inputs: dict[str, Any] | None = None
    untrained_head: str | None = None
    resize: dict[str, Any] | None = None


def load_pretrained(path: str | os.PathLike) -> Pretrained:
    """The model saved at `path` with its class names, image statistics and tokenizer (a model folder:
    all read again if it was replaced meanwhile, since its tokenizer is read after its weights)."""
    folder = Path(path)
    if is_model_folder(folder):  # (a run's folders change as it trains, and are never replaced whole)
        return read_unswapped(folder, lambda: _load(folder), ())
    return _load(folder)


def _load(path: Path) -> Pretrained:
    source = load_source(path)
    model = load_model(source)
    notes = list(source.notes)
    try:
        tokenizer = source_tokenizer(source)
    except TokenizerError as err:  # the model is still usable (e.g. images, or ids made elsewhere)
        tokenizer, problem = None, str(err)  # predict says it when it needs the tokenizer
    else:
        problem = None
    stats = source.image_stats or {}
    mean, std = stats.get("mean"), stats.get("std")
    return Pretrained(model, source.meta.get("model", ""), model_kind(source.meta["model_config"]), source.path,
                      source.classes, tuple(mean) if mean else None, tuple(std) if std else None, tokenizer, notes,
                      problem, source.text_inputs, source.untrained_head, source.image_resize)


def from_pretrained(path: str | os.PathLike) -> nn.Module:
    """The model saved at `path`, with its weights, in eval mode (see load_pretrained for the rest)."""
    return load_pretrained(path).model


def save_pretrained(model: nn.Module | Pretrained, folder: str | os.PathLike, *, classes: list[str] | None = None,
                    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, tokenizer: Any = None,
                    format: str = "widenet", overwrite: bool = False) -> Path:
    """Write a model as a folder: format "widenet", the folder from_pretrained, `widenet predict` and
    `--init` read (as `widenet export` writes it); "hf", a Hugging Face checkpoint that transformers
    loads (ViT and dense post-norm text models; models.hf_export.HFExportError for others). A
    Pretrained (load_pretrained) brings its class names, image mean / std, tokenizer and how its
    texts and images are prepared; arguments given here take their place. A torch.compile'd model is
    written as the model it compiled. The folder appears whole or
    not at all; a model folder already there is replaced only with overwrite=True."""
    if format not in ("widenet", "hf"):
        raise ValueError(f"format must be 'widenet' or 'hf', got {format!r}")
    loaded = model if isinstance(model, Pretrained) else None
    module = loaded.model if loaded else model
    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper: the model it compiled
    if not isinstance(module, (VisionTransformer, TextTransformer)):
        raise TypeError(f"save_pretrained takes a widenet VisionTransformer or TextTransformer (or what "
                        f"load_pretrained returns), got {type(module).__name__}")
    mean = mean if mean is not None else loaded.mean if loaded else None
    std = std if std is not None else loaded.std if loaded else None
    given = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in dict(mean=mean, std=std).items()
             if v is not None}  # (checked by write_export: both, one finite number per channel)
    name = loaded.model_name if loaded else getattr(module, "model_name", "")
    return write_export(folder, module, model_name=name,
                        classes=classes if classes is not None else loaded.classes if loaded else None,
                        image_stats=given or None, tokenizer=tokenizer if tokenizer is not None else
                        loaded.tokenizer if loaded else None, overwrite=overwrite,
                        inputs=loaded.inputs if loaded else None, image_resize=loaded.resize if loaded else None,
                        untrained_head=loaded.untrained_head if loaded else None,
                        hf=format == "hf")  # (into the folder it came from too: the weights are in memory)
