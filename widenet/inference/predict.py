"""Predictions from a loaded model (`load_pretrained`): image classes, text classes, QA answers.

    predict_images(pretrained, ["cat.png", "photos/", "shots/*.jpg"])  -> [ImagePrediction | ImageFailure]
    classify_texts(pretrained, ["a sentence", ("premise", "hypothesis")]) -> [TextPrediction]
    answer_questions(pretrained, [(question, context), ...])            -> [Answer]

Inputs are prepared as training and evaluation prepared them: images decoded like
an image folder (`decode_image`: turned upright by their EXIF orientation, shorter
side resized to the model's image size, center crop; a Hugging Face ViT's as its
processor does: squashed, with its filter) and normalised with the mean / std
saved with the model; sentences by `encode_classification`, questions by
`encode_squad`, with the lengths the model was fine-tuned with (train.text_inputs;
else fine-tuning's defaults: 128 tokens, 384-token windows, stride 128), answers
by `postprocess_squad`.
An image that cannot be read comes back as an ImageFailure in its place; inputs
that do not fit the model raise PredictError (a ValueError), one line. The
iter_* forms yield results as their batches finish. MoE layers route every
token (dropless) here, whatever their capacity, so that an input's prediction
does not depend on the rest of its batch (`layers.moe.dropless_routing`).
"""

from __future__ import annotations

import glob
import math
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.augment import normalize
from ..data.errors import DatasetError
from ..data.images import channels_problem
from ..data.images.folder import IMAGE_EXAMPLES, decode_image, folder_files
from ..layers.moe import dropless_routing
from ..runtime import first_line, resolve_device
from ..train.exported import non_finite_problem
from ..train.hf_folder import fallback_stats
from .loading import Pretrained

__all__ = ["Answer", "ClassScore", "ImageFailure", "ImagePrediction", "PredictError", "TextPrediction",
           "check_finite_scores", "check_fits", "find_images", "iter_predict_images", "predict_images"]

N_BEST, MAX_ANSWER_LEN = 20, 30  # postprocess_squad's defaults: candidate starts / ends, longest answer
PROGRESS_MIN_BATCHES = 3  # a progress bar for more batches than this (on a terminal)

class PredictError(ValueError):
    """Inputs that do not fit the model, or no inputs at all: one line saying what is wrong."""


@dataclass
class ClassScore:
    name: str
    probability: float

    def to_record(self) -> dict[str, Any]:
        return {"class": self.name, "probability": self.probability}


@dataclass
class ImagePrediction:
    """The top classes of one image, most probable first."""
    file: str
    top: list[ClassScore]
    ok = True

    def to_record(self) -> dict[str, Any]:
        return {"file": self.file, "top": [c.to_record() for c in self.top]}


@dataclass
class ImageFailure:
    """An image that could not be read, and why (one line)."""
    file: str
    reason: str
    ok = False

    def to_record(self) -> dict[str, Any]:
        return {"file": self.file, "error": self.reason}


@dataclass
class TextPrediction:
    """The top classes of one sentence (pair), most probable first."""
    text: str
    text_pair: str | None
    top: list[ClassScore]

    def to_record(self) -> dict[str, Any]:
        pair = {} if self.text_pair is None else {"text_pair": self.text_pair}
        return {"text": self.text, **pair, "top": [c.to_record() for c in self.top]}


@dataclass
class Answer:
    """The best span of the context ("" for none); score: its probability in its window,
    softmax(start)[s] * softmax(end)[e]."""
    question: str
    answer: str
    score: float
    context: str = field(default="", repr=False)

    def to_record(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "score": self.score}


# --- what a model takes ------------------------------------------------------------------
_TAKES = {"images": "image files, folders or globs", "text": "sentences (--text FILE, or - for stdin)",
          "qa": "--question with --context or --context-file"}
_IS = {"vision": "an image classifier", "classify": "a text classifier", "qa": "a question-answering model",
       "pretrain": "a pretrained text model (masked LM) without a task head"}


def check_fits(pretrained: Pretrained, inputs: str) -> None:
    """Raise PredictError unless `pretrained` predicts on `inputs` ("images", "text" or "qa")."""
    if inputs not in _TAKES:
        raise ValueError(f"inputs must be one of {', '.join(_TAKES)}, got {inputs!r}")
    task = "vision" if pretrained.kind == "vision" else getattr(pretrained.model.cfg, "task", None)
    described = f"{pretrained.model_name or 'the model'} is {_IS.get(task, f'a text model (task {task!r})')}"
    if task == "pretrain":
        raise PredictError(f"{described}: it predicts no classes or answers; fine-tune it first "
                           f"(widenet finetune --task classify|qa --init {pretrained.source})")
    wanted = {"vision": "images", "classify": "text", "qa": "qa"}.get(task)
    if wanted is None:
        raise PredictError(f"{described}, which predict does not handle")
    if inputs != wanted:
        raise PredictError(f"{described}; it takes {_TAKES[wanted]}, not {_TAKES[inputs]}")
    if pretrained.untrained_head:
        how = "widenet train --init" if task == "vision" else f"widenet finetune --task {task} --init"
        raise PredictError(f"{pretrained.source}: {pretrained.untrained_head} was never trained (the checkpoint "
                           f"holds no weights for it, so they are random) and its predictions would mean "
                           f"nothing; fine-tune it first ({how} {pretrained.source})")
    if pretrained.kind == "text" and pretrained.tokenizer is None:
        if pretrained.tokenizer_problem:
            raise PredictError(f"{pretrained.tokenizer_problem}, so its text cannot be encoded")
        raise PredictError(f"{pretrained.source}: no tokenizer saved beside the model (tokenizer.json), "
                           "so its text cannot be encoded")
    if task == "vision" and (problem := channels_problem(pretrained.model.cfg.in_channels)) is not None:
        raise PredictError(f"{pretrained.source}: {problem}")


# --- shared machinery --------------------------------------------------------------------
def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive whole number, got {value!r}")


def _progress(total: int, batch_size: int, unit: str, show: bool | None):
    """A tqdm bar on stderr: shown when asked (show=True), or, by default, for more than a few
    batches on a terminal."""
    from tqdm import tqdm

    if show is None:
        show = math.ceil(total / batch_size) > PROGRESS_MIN_BATCHES and sys.stderr.isatty()
    return tqdm(total=total, unit=unit, dynamic_ncols=True, leave=False, disable=not show, file=sys.stderr)


def _class_names(pretrained: Pretrained, count: int) -> list[str]:
    """The saved class names when they fit the head, else the class indices as text (with a note when
    names were saved: a hand-edited list, or the names of another model)."""
    classes = pretrained.classes
    if classes and len(classes) == count:
        return [str(c) for c in classes]
    if classes:
        warnings.warn(f"{pretrained.source}: {len(classes)} class names are saved for the model's {count} outputs; "
                      "classes are shown by number", stacklevel=3)
    return [str(i) for i in range(count)]


def check_finite_scores(pretrained: Pretrained, *scores: torch.Tensor) -> None:
    """Refuse NaN or infinite scores, which would be ranked and printed as if they meant something
    (QA masks impossible spans with a finite score, so any inf is an overflow)."""
    if any(not bool(s.isfinite().all()) for s in scores):
        raise PredictError(non_finite_problem(pretrained.source, pretrained.model))


def _top(pretrained: Pretrained, logits: torch.Tensor, names: list[str], top_k: int) -> list[list[ClassScore]]:
    """(B, K) logits -> per row the top_k (capped at K) classes and their softmax probabilities."""
    probs = logits.float().softmax(-1)
    check_finite_scores(pretrained, probs)  # NaN also where a logit was inf
    values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [[ClassScore(names[i], p) for p, i in zip(row_p, row_i)]
            for row_p, row_i in zip(values.cpu().tolist(), indices.cpu().tolist())]


def _on_device(pretrained: Pretrained, device: str | torch.device) -> tuple[nn.Module, torch.device]:
    """The model in eval mode on `device` (moved there: it stays, for the next call)."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return pretrained.model.to(dev).eval(), dev


# --- images ------------------------------------------------------------------------------
def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The image files `inputs` name, in order, each once: a file as is (whatever its name; a missing
    one fails when read), a folder's image files (data.images.folder.folder_files: recursively,
    sorted), a glob's matches (sorted, `**` spans folders). A folder or glob that yields nothing
    raises PredictError."""
    out: dict[Path, None] = {}
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            found = folder_files(path)[0]
            if not found:
                raise PredictError(f"{text}: no images in this folder (looked for {IMAGE_EXAMPLES} files, in "
                                   "subfolders too)")
        elif path.exists() and not path.is_file():  # a FIFO or a device would block or never end
            raise PredictError(f"{text}: not a regular file or a folder")
        elif path.exists() or not any(c in text for c in "*?["):
            found = [path]
        else:
            found = []
            for match in sorted(glob.glob(text, recursive=True)):
                m = Path(match)
                found.extend(folder_files(m)[0] if m.is_dir() else [m] if m.is_file() else [])
            if not found:
                raise PredictError(f"{text}: no files match this pattern")
        out.update(dict.fromkeys(found))
    if not out:
        raise PredictError("no images given")
    return list(out)


def _decode(path: Path, size: int, channels: int, resize: dict[str, Any] | None = None
            ) -> torch.Tensor | ImageFailure:
    """The image as decode_image gives it (resize: its crop and resample, when the model's own), or an
    ImageFailure saying in words why Pillow could not."""
    from PIL import UnidentifiedImageError

    try:
        return decode_image(path, size, channels, **(resize or {}))
    except DatasetError as err:
        cause = err.__cause__
        if isinstance(cause, UnidentifiedImageError):
            return ImageFailure(str(path), "not an image Pillow can decode (unknown format or damaged file)")
        if isinstance(cause, OSError) and cause.strerror:
            return ImageFailure(str(path), cause.strerror)
        return ImageFailure(str(path), first_line(cause if cause is not None else err).removeprefix(f"{path}: "))


def _image_stats(pretrained: Pretrained, channels: int) -> tuple[Sequence[float], Sequence[float]]:
    if pretrained.mean is not None and pretrained.std is not None:
        return pretrained.mean, pretrained.std
    return fallback_stats(pretrained.source, channels)


def iter_predict_images(pretrained: Pretrained, inputs: Iterable[str | os.PathLike], top_k: int = 5,
                        batch_size: int = 64, device: str | torch.device = "auto", progress: bool | None = None,
                        workers: int | None = None) -> Iterator[ImagePrediction | ImageFailure]:
    """predict_images, one result at a time as the batches finish (same order)."""
    _check_sizes(top_k=top_k, batch_size=batch_size)
    check_fits(pretrained, "images")
    paths = find_images(inputs)
    cfg = pretrained.model.cfg
    size, channels = cfg.image_size, cfg.in_channels
    mean, std = _image_stats(pretrained, channels)
    names = _class_names(pretrained, cfg.num_classes)
    model, dev = _on_device(pretrained, device)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool, _progress(len(paths), batch_size, "image", progress) as bar:
        for batch in _batches(paths, batch_size):
            decoded = list(pool.map(lambda p: _decode(p, size, channels, pretrained.resize), batch))
            good = [i for i, d in enumerate(decoded) if isinstance(d, torch.Tensor)]
            results: list[Any] = list(decoded)
            if good:
                images = torch.stack([decoded[i] for i in good]).to(dev)  # uint8 (B, C, S, S)
                with torch.inference_mode():
                    with dropless_routing(model):  # an answer must not depend on its batch
                        logits = model(normalize(images, mean, std)).logits
                for i, top in zip(good, _top(pretrained, logits, names, top_k)):
                    results[i] = ImagePrediction(str(batch[i]), top)
            bar.update(len(batch))
            yield from results


def predict_images(pretrained: Pretrained, inputs: Iterable[str | os.PathLike], top_k: int = 5,
                   batch_size: int = 64, device: str | torch.device = "auto", progress: bool | None = None,
                   workers: int | None = None) -> list[ImagePrediction | ImageFailure]:
    """The top_k classes (at most all) of each image `inputs` name (files, folders, globs: find_images),
    in order; one that cannot be read is an ImageFailure (`.ok` False). Decoded on `workers` threads,
    classified `batch_size` at a time on `device` (auto, cpu, cuda or a torch.device; the model moves)."""
    return list(iter_predict_images(pretrained, inputs, top_k, batch_size, device, progress, workers))
