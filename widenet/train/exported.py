"""Model folders to ship: what `widenet export`, `widenet upcycle` and `widenet import` write.

    DIR/config.json        {"format": "widenet-model", "format_version": 1, "widenet_version": ...,
                            "model": preset name, "kind": "vision" | "text", "model_config": {...},
                            "classes": [...] or null, "image": {"mean": [...], "std": [...]} (vision),
                            "data": the dataset's name it was trained on (widenet eval's default), or absent,
                            "tokenizer": {"fingerprint", "vocab_size"} (text), "source": where it came from,
                            "weights_sha256": model.safetensors' tensors_digest (files.py), or absent}
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

import contextlib
import errno
import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors import SafetensorError
from torch import nn

from ..data.text.tokenizer import check_same_tokenizer, load_tokenizer, save_tokenizer, tokenizer_record
from ..files import (WeightsDamaged, WeightsMismatch, fsync_path, load_safetensors, raise_if_disk_full,
                     refuse_dead_link, save_safetensors)
from ..listing import listed
from ..models.hf import is_hf_folder
from ..models.hf_export import hf_checkpoint
from ..models.text import TextConfig, TextTransformer
from ..models.vision import VisionConfig, VisionTransformer
from ..settings import finite_numbers
from .checkpoint import (CheckpointError, check_finite, check_model_keys, find_latest_checkpoint, load_checkpoint,
                         train_state_of)
from .checkpoint_layout import remove_tree
from .export_contents import check_contents, resize_setting, stats_problem
from .export_destination import (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, carry_user_files, check_destination,
                                 clear_leftovers, move_into_place, temporary)
from .hf_folder import HF_WIDENET_KEYS, hf_side_files, read_hf_source
from .text_inputs import recorded_inputs

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "HEADS", "Source", "config_problem", "init_source", "require_kind",
           "is_export", "is_model_folder", "load_model", "load_source", "model_from_meta", "non_finite_problem",
           "read_export", "read_unswapped", "run_tokenizer_file", "weights_from", "write_export"]

T = TypeVar("T")
EXPORT_FORMAT = "widenet-model"
EXPORT_VERSION = 1


@dataclass
class Source:
    """Any starting point read like a training checkpoint (LoadedCheckpoint's fields), with the
    tokenizer file beside it (text models) or None, and notes for the user (e.g. new heads)."""

    path: Path
    step: int | None  # the training step of a checkpoint; None for an export or a Hugging Face folder
    meta: dict
    model_state: dict[str, torch.Tensor]
    _train_state: dict | Callable[[], dict] = field(repr=False)  # a callable reads it at first use
    tokenizer_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    # A BERT vocab.txt: load_tokenizer's lowercase, strip_accents and chinese_chars, as its tokenizer_config says.
    tokenizer_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def train_state(self) -> dict:
        """The optimizer state, the weight average...: a checkpoint's state.pt is read only here, so
        eval, predict and export of the weights are not held up (or stopped) by it."""
        if callable(self._train_state):
            self._train_state = self._train_state()
        return self._train_state

    @property
    def classes(self) -> list[str] | None:
        """Class names: an image run's classes, a text classifier's labels; None when unknown."""
        data = self.meta.get("data") or {}
        names = data.get("classes") or data.get("labels")
        return list(names) if names else None

    @property
    def text_inputs(self) -> dict[str, Any] | None:
        """How fine-tuning prepared a text model's inputs (train.text_inputs), or None."""
        return recorded_inputs(self.meta, self.path)

    @property
    def untrained_head(self) -> str | None:
        """The task head whose weights the model's checkpoint did not hold (a Hugging Face folder
        saved without its classifier, or an import of one): random, so predictions mean nothing."""
        head = (self.meta.get("data") or {}).get("untrained_head")
        return head if isinstance(head, str) else None

    @property
    def image_resize(self) -> dict[str, Any] | None:
        """How images are brought to the model's size when it is not widenet's own way (the central
        square, bicubic): {"crop": bool, "resample": one of RESAMPLING (data.images.folder)}, or None."""
        return resize_setting((self.meta.get("data") or {}).get("resize"), self.path)

    @property
    def image_stats(self) -> dict[str, list[float]] | None:
        """{"mean", "std"} images were normalised with in training, or None. Saved statistics that
        are not one finite number per channel (std > 0) raise CheckpointError: a hand-edited or
        damaged meta.json would otherwise give NaN scores or silently wrong ones."""
        data = self.meta.get("data") or {}
        stats = {k: data[k] for k in ("mean", "std") if data.get(k) is not None}
        channels = (self.meta.get("model_config") or {}).get("in_channels")
        for key, values in stats.items():
            if (problem := stats_problem(key, values, channels, saved=True)) is not None:
                raise CheckpointError(f"{self.path}: {problem}")
        return {k: list(v) for k, v in stats.items()} or None


def is_model_folder(path: str | os.PathLike) -> bool:
    """A folder holding a model widenet writes: an export, or a Hugging Face checkpoint folder."""
    return is_export(path) or is_hf_folder(path)


def is_export(path: str | os.PathLike) -> bool:
    config = Path(path) / CONFIG_FILE
    try:
        return config.is_file() and json.loads(config.read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def config_problem(folder: str | os.PathLike, hf_only: bool = False) -> str:
    """Why folder's config.json makes it neither a widenet export nor a Hugging Face checkpoint
    (hf_only: why it is not a Hugging Face checkpoint)."""
    file = Path(folder) / CONFIG_FILE
    wanted = "a Hugging Face checkpoint" if hf_only else "a widenet export or a Hugging Face checkpoint"
    if not file.is_file():
        return f"{folder}: no {CONFIG_FILE}, so not {wanted}"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        return f"{file}: not valid JSON ({err})"
    except OSError as err:
        return f"{file}: unreadable ({err.strerror or err})"
    if not isinstance(config, dict):
        return f"{file}: not a JSON object"
    lacks = '"model_type"' if hf_only else f'"format": "{EXPORT_FORMAT}" or "model_type"'
    return f"{file}: has no {lacks}, so its folder is not {wanted}"


def require_kind(source: Source, kind: str, command: str = "--init") -> None:
    """Raise CheckpointError unless source holds a `kind` ("vision" or "text") model."""
    names = {"vision": "an image model", "text": "a text model"}
    found = model_kind(source.meta.get("model_config") or {})
    if found != kind:
        raise CheckpointError(f"{source.path}: {command} needs {names[kind]}, this one is {names[found]}")


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
                 tokenizer: Any = None, source: Any = None, overwrite: bool = False,
                 protect: str | os.PathLike | None = None, data: str | None = None,
                 inputs: dict | None = None, untrained_head: str | None = None,
                 image_resize: dict | None = None, hf: bool = False) -> Path:
    """Write `model` as an export folder at `out` (see module doc), atomically: a folder of the same
    name appears whole or not at all, and an old one is swapped out only once the new one is
    complete. overwrite=True replaces an earlier export folder's model (never a run folder, a
    folder another run holds, or other files; files the user added beside the model, such as a
    model card, are carried into the new folder; an `out` that is a symbolic link stays one, and
    the folder it points to gets the model); `protect`: a folder (the model's source) that `out` must
    not be, contain or lie inside. tokenizer_file: a tokenizer.json or BERT vocab.txt, saved in
    the folder as tokenizer.json; or `tokenizer`, a tokenizers.Tokenizer. data: the name of the
    dataset the model was trained on, which `widenet eval` then evaluates on by default. inputs: how
    fine-tuning prepared a text model's inputs (train.text_inputs), which predict reuses.
    untrained_head: the task head the source held no weights for (Source.untrained_head);
    image_resize: Source.image_resize. hf=True writes a Hugging Face checkpoint folder instead, for
    the models transformers has a class for (models/hf_export.py: HFExportError for others):
    transformers' config.json and tensor names, tokenizer.json with tokenizer_config.json or
    preprocessor_config.json (hf_folder.hf_side_files); `widenet import` reads it back."""
    from .. import __version__

    out = Path(out)
    if tokenizer_file is not None:
        tokenizer = load_tokenizer(tokenizer_file)
    check_contents(model, classes, image_stats, tokenizer)
    if hf:  # refused before anything is touched when transformers has no class for the model
        config, weights = hf_checkpoint(model, classes)
        for field_name, value in dict(inputs=inputs, untrained_head=untrained_head).items():
            if value:  # widenet's own notes (hf_folder.HF_WIDENET_KEYS), which its import reads back
                config[HF_WIDENET_KEYS[field_name]] = value
    refuse_dead_link(out)
    if out.is_symlink():  # a link names where the model goes: it stays a link, its folder gets the model
        out = Path(os.path.realpath(out))
    clear_leftovers(out, is_model_folder)  # (an earlier model a killed export set aside is back before the check)
    check_destination(out, overwrite, protect, is_model_folder)
    token_meta = None
    if tokenizer is not None:
        token_meta = tokenizer_record(tokenizer)
    side = hf_side_files(model, image_stats, image_resize, tokenizer is not None, inputs) if hf else {}
    if not hf:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        config = dict(format=EXPORT_FORMAT, format_version=EXPORT_VERSION, widenet_version=__version__,
                      model=model_name, kind=model_kind(model.cfg.to_dict()), model_config=model.cfg.to_dict(),
                      classes=classes, image=image_stats, tokenizer=token_meta, source=source)
        for key, value in dict(data=data, inputs=inputs, untrained_head=untrained_head,
                               image_resize=image_resize).items():
            if value:
                config[key] = value
    tmp = temporary(out)
    try:
        remove_tree(tmp)
        tmp.mkdir(parents=True)
        digest = save_safetensors(weights, tmp / WEIGHTS_FILE, {"format": "pt"} if hf else None)
        if not hf:
            config["weights_sha256"] = digest  # binds the two files: read_export
        for name, content in {CONFIG_FILE: config, **side}.items():
            (tmp / name).write_text(json.dumps(content, indent=1) + "\n")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
        for file in tmp.iterdir():
            file.chmod(0o644)  # a folder to ship: readable by others, as a checkout would be
            fsync_path(file)
        carry_user_files(out, tmp)
        move_into_place(tmp, out, overwrite)
    except BaseException as err:  # also Ctrl-C and SIGTERM: no half-written folder is left beside OUT
        with contextlib.suppress(OSError):  # the write's own failure is the one to report
            remove_tree(tmp)
        if not isinstance(err, (OSError, SafetensorError)):
            raise
        raise_if_disk_full(err, out)
        if isinstance(err, OSError) and err.errno is not None and str(err.filename or "").startswith(str(tmp)):
            raise OSError(err.errno, err.strerror, str(out)) from None  # the destination, not the folder beside it
        if isinstance(err, OSError):
            raise
        raise CheckpointError(f"{out}: could not write the weights ({err})") from None
    return out


def read_export(path: str | os.PathLike) -> Source:
    """An export folder as a Source (meta in the shape of a training checkpoint's, no step)."""
    folder = Path(path)
    config = _read_config(folder)
    try:
        state = load_safetensors(folder / WEIGHTS_FILE, config.get("weights_sha256"))
    except WeightsMismatch:  # (a folder swapped meanwhile is read again: load_source)
        raise CheckpointError(f"{folder}: the weights digest its {CONFIG_FILE} records (weights_sha256) does not "
                              f"match its {WEIGHTS_FILE}: one of the two was changed or replaced after they were "
                              "written together; put back the files as written, or write the folder again") from None
    except WeightsDamaged as err:
        raise CheckpointError(str(err)) from None
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: could not read the weights ({err})") from None
    image = config.get("image") or {}
    classes = config.get("classes")
    names_ok = classes is None or (isinstance(classes, list) and all(isinstance(c, str) for c in classes))
    stats_ok = isinstance(image, dict) and set(image) <= {"mean", "std"} and all(map(finite_numbers, image.values()))
    if not (names_ok and stats_ok):
        raise CheckpointError(f"{folder / CONFIG_FILE}: 'image' must be {{mean, std}} with finite numbers and "
                              "'classes' a list of names")
    meta = dict(model=config.get("model", ""), model_config=config.get("model_config"),
                data=dict(classes=classes, **image))
    if isinstance(config.get("data"), str):
        meta["data"]["name"] = config["data"]
    if "inputs" in config:
        meta["data"]["inputs"] = config["inputs"]
    if isinstance(config.get("untrained_head"), str):
        meta["data"]["untrained_head"] = config["untrained_head"]
    if config.get("image_resize") is not None:
        meta["data"]["resize"] = resize_setting(config["image_resize"], folder / CONFIG_FILE)
    if config.get("tokenizer"):
        token = config["tokenizer"]
        if not isinstance(token, dict) or not isinstance(token.get("fingerprint"), str):
            raise CheckpointError(f"{folder / CONFIG_FILE}: 'tokenizer' must be {{fingerprint, vocab_size}} as "
                                  f"widenet export writes it, got {token!r}")
        meta["tokenizer"] = token
    tokenizer = folder / TOKENIZER_FILE
    return Source(folder, None, meta, state, {}, tokenizer if tokenizer.is_file() else None)


def _read_config(folder: Path) -> dict[str, Any]:
    """An export's config.json, its format version checked."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE}: unreadable ({err})") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{folder / CONFIG_FILE}: format_version {version!r} is not a version number")
    if version > EXPORT_VERSION:
        raise CheckpointError(f"{folder}: format version {version} is newer than this widenet reads "
                              f"({EXPORT_VERSION}); upgrade widenet")
    return config


def read_unswapped(folder: Path, read: Callable[[], T], unsettled: tuple[type[BaseException], ...]) -> T:
    """read(), again if `folder` was swapped for another meanwhile (its device, inode or change time
    changed: an `export --overwrite` renames the new folder into place), so that no result mixes two
    folders' files; an error of the types `unsettled` (a torn read taken for damage) counts only if the
    folder stayed. A folder swapped during both reads raises OSError (EAGAIN) saying so, or the second
    read's error. For model folders (export, Hugging Face): a run's folders change as it trains."""
    def identity() -> tuple[int, int, int] | None:  # (the change time too: a new folder may reuse the inode)
        with contextlib.suppress(OSError):
            stat = os.stat(folder)
            return stat.st_dev, stat.st_ino, stat.st_ctime_ns
        return None

    for again in (False, True):
        before = identity()
        try:
            result = read()
        except unsettled:
            if again or identity() == before:
                raise
            continue
        if identity() == before:
            return result
    raise OSError(errno.EAGAIN, "replaced by another process while it was read, twice; read it again when nothing "
                  "writes it", str(folder))


def load_source(path: str | os.PathLike) -> Source:
    """Any starting point as a Source: an export folder, a Hugging Face checkpoint folder, a run
    folder (its latest checkpoint), a checkpoint folder or a model.safetensors inside one."""
    path = Path(path)
    if not path.exists():
        hub = len(path.parts) <= 2 and not (path.is_absolute() or path.suffix or str(path)[:1] in (".", "~"))
        hint = ("; if it names a Hugging Face hub model: widenet reads local folders only, so download it "
                "first (e.g. huggingface_hub's snapshot_download) and pass that folder" if hub else "")
        raise FileNotFoundError(errno.ENOENT, "does not exist" + hint, str(path))
    if path.is_file() and path.name in (WEIGHTS_FILE, CONFIG_FILE) and (
            is_export(path.parent) or is_hf_folder(path.parent)):
        path = path.parent  # a file of a model folder (only a checkpoint's model.safetensors is read alone)
    if is_export(path):
        return read_unswapped(path, lambda: read_export(path), (CheckpointError,))
    if is_hf_folder(path):
        hf = read_unswapped(path, lambda: read_hf_source(path), (ValueError, OSError))
        return Source(path, None, hf.meta, hf.model_state, {}, hf.tokenizer_path, hf.notes, hf.tokenizer_settings)
    if (path / CONFIG_FILE).is_file():  # checkpoints hold meta.json: this was meant as an export or HF folder
        raise CheckpointError(config_problem(path))
    ckpt = load_checkpoint(find_latest_checkpoint(path) or path, read_train_state=False)
    tokenizer = run_tokenizer_file(ckpt.path)
    return Source(ckpt.path, ckpt.step, ckpt.meta, ckpt.model_state, partial(train_state_of, ckpt.path, ckpt.meta),
                  tokenizer if tokenizer.is_file() else None)


def run_tokenizer_file(checkpoint: Path) -> Path:
    """Where a training run keeps its tokenizer: its folder's tokenizer.json (OUT/checkpoints/step_N ->
    OUT/tokenizer.json)."""
    return checkpoint.parent.parent / TOKENIZER_FILE


def init_source(init: str, out: str | os.PathLike, resume: bool, kind: str | None = None) -> Source:
    """What a run started with `--init` builds its model from: the init model, or when resuming
    the run's own latest checkpoint (it holds the same config, and the init folder may be gone);
    checked to hold a `kind` model ("vision" or "text") when one is named."""
    latest = find_latest_checkpoint(out) if resume else None
    source = load_source(latest or init)
    if kind is not None:
        require_kind(source, kind)
    return source


def non_finite_problem(source: str | os.PathLike, model: nn.Module) -> str:
    """The line for a model whose scores came out NaN or inf: whether its weights are to blame."""
    bad = sum(int((~p.detach().isfinite()).sum()) for p in model.parameters())
    why = (f"{bad} of its weights are NaN or inf" if bad else
           "its weights are finite but so large that the activations overflow")
    return f"{source}: the model's scores are NaN or inf ({why}); its results would be meaningless"


def source_tokenizer(source: Source):
    """The tokenizer saved beside `source` (a tokenizers.Tokenizer), or None; TokenizerError if unusable
    or not the one the model was trained with."""
    if source.tokenizer_path is None:
        return None
    tokenizer = load_tokenizer(source.tokenizer_path, **source.tokenizer_settings)
    check_tokenizer_matches(tokenizer, source.tokenizer_path, source)
    return tokenizer


def check_tokenizer_matches(tokenizer, path: Path, source: Source) -> None:
    """TokenizerError unless `tokenizer` (read from `path`) is the one source's model was trained with
    (data.text.tokenizer.check_same_tokenizer, against what its checkpoint or export recorded)."""
    check_same_tokenizer(tokenizer, path, source.meta.get("tokenizer") or {},
                         source.meta["model_config"].get("vocab_size"), source.path)


def load_model(source: Source) -> nn.Module:
    """The model of `source` with its weights, in eval mode; every weight must be finite."""
    model = model_from_meta(source.meta)
    check_finite(source.model_state, source.path)
    check_model_keys(source.path, source.meta, source.model_state, model)
    model.load_state_dict(source.model_state, strict=True)
    return model.eval()


def weights_from(source: Source, model: nn.Module, skip_heads: bool) -> list[str]:
    """Copy `source`'s weights into `model` (same architecture); with skip_heads, tensors whose shape
    differs in a head (classes) are left as initialised. Returns the keys left out."""
    check_finite(source.model_state, source.path)
    own = model.state_dict()
    left: list[str] = []
    new = {}
    for key, tensor in source.model_state.items():
        if key not in own:
            continue
        if tuple(own[key].shape) != tuple(tensor.shape):
            if skip_heads and key.split(".")[0] in HEADS:  # (a head the source lacks, too, starts new)
                left.append(key)
                continue
            hint = _SHAPE_HINTS.get(key.split(".")[0], "")
            raise CheckpointError(f"{source.path}: {key} has shape {tuple(tensor.shape)}, the model needs "
                                  f"{tuple(own[key].shape)}{hint}")
        new[key] = tensor
    missing = [k for k in own if k not in new and k not in left and not (skip_heads and k.split(".")[0] in HEADS)]
    if missing:
        raise CheckpointError(f"{source.path}: no weights for {listed(missing)}")
    model.load_state_dict(new, strict=False)
    return left


HEADS = ("head", "classifier", "span_head", "sop_head", "mlm_head")
_SHAPE_HINTS = {"pos_embed": " (the images' size differs from the model's: pass --image-size)",
                "patch_embed": " (the images' channels or size differ from the model's)"}
