"""What a Hugging Face checkpoint folder gives widenet (train/exported.py makes a Source of it): the
model (models/hf.py), its label names, how its image processor prepares images, and how its
vocab.txt is tokenized; and, the other way, the image processor and tokenizer settings a folder
widenet writes for transformers holds (hf_side_files)."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.images.folder import RESAMPLING
from ..data.text.tokenizer import SPECIAL_TOKENS
from ..models.hf import load_hf
from ..models.hf_export import hf_channels
from ..models.vision import VisionTransformer
from ..settings import finite_numbers

__all__ = ["FALLBACK_MEAN", "FALLBACK_STD", "HF_WIDENET_KEYS", "HFSource", "fallback_stats", "hf_side_files",
           "image_preparation", "preparation_gaps", "read_hf_source", "vocab_settings"]


# What a config.json widenet writes keeps beside transformers' keys, by meta["data"] field: how fine-tuning
# prepared the texts (train.text_inputs), and the head that was never trained (a random one: predict says so).
HF_WIDENET_KEYS = {"inputs": "widenet_inputs", "untrained_head": "widenet_untrained_head"}


@dataclass
class HFSource:
    """meta (model, model_config, data: classes, image preparation, untrained_head) and weights as a
    checkpoint holds them; the tokenizer file (tokenizer.json, else a BERT vocab.txt) and load_tokenizer's
    settings for a vocab.txt; notes for the user (heads left new)."""

    meta: dict
    model_state: dict[str, torch.Tensor]
    tokenizer_path: Path | None
    tokenizer_settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def read_hf_source(path: Path) -> HFSource:
    """A Hugging Face folder: the model (models/hf.py), its label names, what its
    preprocessor_config.json asks of images (image_preparation), the head it lacks weights for, and
    its tokenizer.json or vocab.txt (read as its tokenizer_config.json says: vocab_settings)."""
    imported = load_hf(path)
    model = imported.model
    data: dict[str, Any] = dict(classes=imported.classes)
    notes = list(imported.notes)
    if imported.kind == "vision":
        processor = _json_or_empty(path / "preprocessor_config.json")
        data.update(image_preparation(processor, model.cfg.in_channels))
        notes += preparation_gaps(processor, model.cfg.image_size)
    if imported.untrained_head:
        data["untrained_head"] = imported.untrained_head
    config = _json_or_empty(path / "config.json")
    for field_name, key in HF_WIDENET_KEYS.items():  # (checked where read: Source.text_inputs, untrained_head)
        if config.get(key) is not None:
            data.setdefault(field_name, config[key])
    meta = dict(model=imported.model_name, model_config=model.cfg.to_dict(), data=data)
    tokenizer = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path / "vocab.txt"
    settings = vocab_settings(_json_or_empty(path / "tokenizer_config.json"))
    return HFSource(meta, model.state_dict(), tokenizer if tokenizer.is_file() else None, settings, notes)


# No image statistics saved (a Hugging Face ViT's own folder): ViT's image processor's defaults,
# which widenet's eval and predict use too (fallback_stats).
FALLBACK_MEAN, FALLBACK_STD = 0.5, 0.5


def fallback_stats(where: str | os.PathLike, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ViT's mean and std for a model saved without image statistics, with a note naming it."""
    warnings.warn(f"{where}: no image mean / std saved with the model; normalising with mean {FALLBACK_MEAN} and "
                  f"std {FALLBACK_STD} (ViT's)", stacklevel=3)
    return (FALLBACK_MEAN,) * channels, (FALLBACK_STD,) * channels


def hf_side_files(model: nn.Module, image_stats: dict | None = None, image_resize: dict | None = None,
                  with_tokenizer: bool = False, inputs: dict | None = None) -> dict[str, dict]:
    """What transformers' Auto classes read beside the weights, by file name: for a ViT the image
    processor (a 3-channel model's converts grey and RGBA images to RGB, as the pipeline does; squash
    to the model's size with widenet's filter, scale by 1/255, then the training mean and std, or 0.5
    where none were saved, as widenet's predict does; a grey model's on each of R, G and B:
    models.hf_export.GREY_AS_RGB); for a text model with its tokenizer.json, the special
    tokens (widenet's tokenizer.json holds the rest) and the length fine-tuning cut texts to (inputs'
    max_len, else the model's positions)."""
    if isinstance(model, VisionTransformer):
        channels, size = hf_channels(model), model.cfg.image_size
        if image_stats is None:
            warnings.warn(f"no image mean / std saved with the model: its preprocessor_config.json normalises with "
                          f"mean {FALLBACK_MEAN} and std {FALLBACK_STD}, ViT's (the training data's are saved by "
                          "widenet export of a run, or save_pretrained's mean= and std=)", stacklevel=4)
        fallback = dict(mean=[FALLBACK_MEAN], std=[FALLBACK_STD])
        stats = {k: list(v) * (channels // len(v)) for k, v in (image_stats or fallback).items()}
        resample = (image_resize or {}).get("resample", "bicubic")
        return {"preprocessor_config.json": dict(
            image_processor_type="ViTImageProcessor", do_convert_rgb=channels == 3,  # grey, RGBA images to RGB
            do_resize=True, size=dict(height=size, width=size),
            resample=RESAMPLING.index(resample), do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=stats["mean"], image_std=stats["std"])}
    if not with_tokenizer:
        return {}
    return {"tokenizer_config.json": dict(
        tokenizer_class="PreTrainedTokenizerFast",
        **dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS)),
        model_max_length=(inputs or {}).get("max_len", model.cfg.max_positions),
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])}


def vocab_settings(config: dict) -> dict[str, Any]:
    """load_tokenizer's settings for a BERT vocab.txt from its tokenizer_config.json (BertTokenizer's
    do_lower_case, strip_accents, tokenize_chinese_chars; their defaults where absent)."""
    accents = config.get("strip_accents")
    return dict(lowercase=config.get("do_lower_case", True) is not False,
                strip_accents=accents if isinstance(accents, bool) else None,
                chinese_chars=config.get("tokenize_chinese_chars", True) is not False)


def image_preparation(processor: dict, channels: int) -> dict[str, Any]:
    """What a Hugging Face image processor's settings ask of widenet's decoding, as meta["data"]
    fields: mean / std with its rescale factor folded in (widenet divides by 255: p * r - m over s is
    p / 255 - m / 255r over s / 255r), none of them without do_normalize; and resize (whole image
    squashed, with its filter) for a processor that resizes to a height and width, as ViT's does."""
    factor = processor.get("rescale_factor", 1 / 255) if processor.get("do_rescale", True) else 1.0
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if processor.get("do_normalize", True) is False:
        mean, std = [0.0] * channels, [1.0] * channels
    found: dict[str, Any] = {}
    if finite_numbers(mean) and finite_numbers(std) and isinstance(factor, (int, float)) and factor > 0:
        scale = 255 * factor
        found.update(mean=[m / scale for m in mean], std=[v / scale for v in std])
    resample = processor.get("resample", 2)
    if _squashed_to(processor) is not None and isinstance(resample, int) and 0 <= resample < len(RESAMPLING):
        found["resize"] = dict(crop=False, resample=RESAMPLING[resample])
    return found


def _squashed_to(processor: dict) -> set | None:
    """The sides a processor squashes whole images to ({S} for a size S, {H, W} for a height and
    width), or None for another resize (by the shorter side)."""
    size = processor.get("size")
    if isinstance(size, int):
        return {size}
    if isinstance(size, dict) and {"height", "width"} <= set(size):
        return {size["height"], size["width"]}
    return None


def preparation_gaps(processor: dict, image_size: int) -> list[str]:
    """A note when the processor prepares images in a way widenet's predict does not (a center crop
    after the resize, a resize by the shorter side or to another size than the model's)."""
    if processor and (processor.get("do_center_crop") or _squashed_to(processor) != {image_size}):
        size = processor.get("size")
        return [f"its image processor resizes to {size} and crops {processor.get('crop_size') or 'nothing'}, which "
                f"widenet's predict does not reproduce for a {image_size} px model: its probabilities differ a "
                "little from transformers'"]
    return []


def _json_or_empty(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
