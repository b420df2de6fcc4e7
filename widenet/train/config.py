"""Training settings: the recipe every run shares (`RecipeConfig`) and image classification's (`TrainConfig`).

Text runs extend the same base in `text_config.py`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

from ..data.augment import CROP_MODES, AugmentConfig, check_mixup_alpha
from ..data.text.hub import is_hub_name
from ..settings import SettingTypeError, check_types
from .tensorboard import require_tensorboard

OPTIMIZER_NAMES = ("adamw", "lamb")
SCHEDULE_NAMES = ("linear", "cosine", "constant")
CROP_NAMES = CROP_MODES  # AugmentConfig defines them
TTA_NAMES = ("none", "flip")  # test-time augmentation (widenet.train.evaluate)


@dataclass
class RecipeConfig:
    """Model, optimisation, budget and bookkeeping: what every training run has.

    Saved in every checkpoint; `--resume` refuses a changed setting that would
    alter training (anything outside the class's `RESUME_FREE` names).
    """

    model: str = "widenet_tiny"
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 512
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    warmup_fraction: float = 0.05
    schedule: str = "cosine"
    clip_norm: float = 1.0
    dropout: float = 0.0
    aux_weight: float = 0.01
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    save_every: int | None = None
    keep_last: int = 2
    log_every: int = 50
    tensorboard: bool = False  # also write every metrics.jsonl record to OUT/tensorboard/ (widenet.train.tensorboard)
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False  # torch.compile the training forward and backward (widenet.runtime.compile_model)
    time_budget: float | None = None  # minutes: train as many steps as fit (widenet.train.budget)
    ema_decay: float | None = None  # also evaluate an exponential moving average of the weights
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (fully_shard)
    expert_parallel: int = 1  # under torchrun: split each MoE's experts over this many processes
    out: str = "runs/train"
    resume: bool = False
    overwrite: bool = False  # delete a run already in `out` (widenet.train.run_folder)

    # Settings a resumed run may change: where and how it runs, not what it computes.
    RESUME_FREE: ClassVar[tuple[str, ...]] = ("out", "resume", "overwrite", "device", "compile", "save_every", "keep_last",
                                              "log_every", "eval_batch_size", "fsdp", "expert_parallel",
                                              "tensorboard")
    # Whether `--init RUN` continues a run of this kind with all its weights, heads included (a
    # resume refused for a longer run then says so).
    INIT_CONTINUES: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_types(self)  # every field of this class and its subclasses: types, finite numbers
        if not isinstance(self.model_overrides, dict):
            raise SettingTypeError(f"model_overrides must be a dict, got {self.model_overrides!r}")
        _positive(self, "epochs", "batch_size", "eval_batch_size", "log_every", "keep_last")
        _positive(self, "max_steps", "save_every", optional=True)
        _choice(self, "optimizer", OPTIMIZER_NAMES)
        _choice(self, "schedule", SCHEDULE_NAMES)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "clip_norm", "aux_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("dropout", "warmup_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _positive(self, "expert_parallel")
        if self.resume and self.overwrite:
            raise ValueError("give resume or overwrite, not both")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be a positive number of minutes, got {self.time_budget!r}")
        if self.time_budget is not None and self.max_steps is not None:
            raise ValueError("give either time_budget or max_steps, not both")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.ema_decay is not None and (self.fsdp or self.expert_parallel > 1):
            raise ValueError("ema_decay works on one process or under plain data parallelism, "
                             "not with fsdp or expert_parallel (their weights are split across processes)")
        if self.tensorboard:
            require_tensorboard()  # before anything loads or trains: one line with the install command

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Settings that name files or folders: compared on resume as the paths they resolve to (an
    # --init given as ./run, run or /abs/run is one setting).
    PATH_SETTINGS: ClassVar[tuple[str, ...]] = ("init", "data_dir", "corpus", "train", "validation")

    def with_absolute_paths(self) -> RecipeConfig:
        """This config with its path settings (PATH_SETTINGS: files and folders, hub names kept) as
        absolute paths: recorded so, a run resumed or evaluated from another folder finds the same
        ones, and a relative name typed there is not taken for the same setting."""
        paths = {k: _resolved(v) for k in self.PATH_SETTINGS if (v := getattr(self, k, None))}
        return replace(self, **paths) if paths else self

    def resume_conflicts(self, saved: dict[str, Any], saved_folder: str | None = None) -> list[str]:
        """Settings that differ between a saved run and this one and would change training. A path
        setting is the same where it resolves to the same path, or, for a run saved in `saved_folder`
        (absolute), where it lies at the same place relative to the run folder (a folder moved or
        copied with its inputs, as `widenet compare-text`'s output with its task files and runs)."""
        now = self.to_dict()

        def same(key: str) -> bool:
            if key in self.PATH_SETTINGS:
                return _same_paths(saved[key], now[key], saved_folder, self.out)
            return saved[key] == now[key]

        return [k for k in now if k not in self.RESUME_FREE and k in saved and not same(k)]


@dataclass
class TrainConfig(RecipeConfig):
    """Image classification (`widenet train`).

    The paper's ImageNet recipe: LAMB, lr 0.01, weight decay 0.1, warmup 30 of
    300 epochs then linear decay, dropout 0.1, label smoothing 0.1, mixup 0.5,
    RandAugment (2, 15), gradient clipping at 1, balance loss weight 0.01.
    The defaults here suit the small models on Fashion-MNIST.
    """

    data: str = "fashion-mnist"
    data_dir: str | None = None
    init: str | None = None  # start from this model's config and weights (run, export, upcycled or HF folder)
    INIT_CONTINUES: ClassVar[bool] = True
    image_size: int | None = None  # resize to this; an image folder is decoded at it (default: the model's size)
    train_subset: int | None = None
    test_subset: int | None = None
    label_smoothing: float = 0.1
    mixup: float = 0.0
    crop: str = "pad-crop"
    flip: bool = True
    randaugment_n: int = 0
    randaugment_m: float = 15.0
    eval_every: int = 1  # evaluate on the test set every N epochs, and always after the last
    tta: str = "none"  # test-time augmentation: "flip" averages each test image's and its mirror's predictions
    download: bool = True

    RESUME_FREE: ClassVar[tuple[str, ...]] = RecipeConfig.RESUME_FREE + (
        "download", "data_dir", "test_subset", "eval_every", "tta")

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "eval_every")
        _positive(self, "image_size", "train_subset", "test_subset", optional=True)
        _choice(self, "tta", TTA_NAMES)
        self.augment_config()  # crop, flip and RandAugment are checked where they are defined
        check_mixup_alpha(self.mixup)
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


    def augment_config(self) -> AugmentConfig:
        return AugmentConfig(crop=self.crop, flip=self.flip, randaugment_n=self.randaugment_n,
                             randaugment_m=self.randaugment_m)


RESUME_FREE_KEYS = TrainConfig.RESUME_FREE


def _resolved(value: Any) -> Any:
    """A path setting (a string, or a list of them) as absolute paths; hub names and the rest as they are."""
    if isinstance(value, list):
        return [_resolved(v) for v in value]
    return os.path.abspath(value) if isinstance(value, str) and value and not is_hub_name(value) else value


def _same_paths(saved: Any, now: Any, saved_folder: str | None, folder: str) -> bool:
    """Path settings (a string, or lists of them, item by item) naming the same paths, or (with the
    run's `saved_folder`) lying at the same place relative to the run folder then and now."""
    if isinstance(saved, list) and isinstance(now, list):
        return len(saved) == len(now) and all(_same_paths(a, b, saved_folder, folder) for a, b in zip(saved, now))
    if _resolved(saved) == _resolved(now):
        return True
    if saved_folder is None or not all(isinstance(v, str) and v and not is_hub_name(v) for v in (saved, now)):
        return False
    try:
        return os.path.relpath(os.path.abspath(saved), saved_folder) == os.path.relpath(os.path.abspath(now),
                                                                                       os.path.abspath(folder))
    except ValueError:  # (Windows: paths on different drives)
        return False


def _positive(cfg: Any, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _choice(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
