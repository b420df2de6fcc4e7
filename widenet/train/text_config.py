"""Settings for text pretraining (`widenet pretrain`) and fine-tuning (`widenet finetune`).

Both are saved in every checkpoint; `--resume` refuses a changed setting that
would alter training (anything outside the class's `RESUME_FREE` names).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from .config import OPTIMIZER_NAMES, SCHEDULE_NAMES, _choice, _positive

TASK_NAMES = ("classify", "qa")


@dataclass
class TextRunConfig:
    """What every text run shares: model, optimisation, budget, bookkeeping."""

    model: str = "widenet_text_tiny"
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    warmup_fraction: float = 0.1
    schedule: str = "linear"
    clip_norm: float = 1.0
    aux_weight: float = 0.01
    dropout: float = 0.0
    model_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    seed: int = 0
    save_every: int | None = None
    keep_last: int = 2
    log_every: int = 50
    device: str = "auto"
    amp: str = "auto"
    out: str = "runs/text"
    resume: bool = False

    # Settings a resumed run may change: where and how it runs, not what it computes.
    RESUME_FREE: ClassVar[tuple[str, ...]] = ("out", "resume", "device", "save_every", "keep_last",
                                              "log_every", "eval_batch_size", "tokenizer")

    def __post_init__(self) -> None:
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resume_conflicts(self, saved: dict[str, Any]) -> list[str]:
        """Settings that differ from a saved run's and would change training."""
        now = self.to_dict()
        return [k for k in now if k not in self.RESUME_FREE and k in saved and saved[k] != now[k]]


@dataclass
class PretrainConfig(TextRunConfig):
    """Masked-LM (15% of word pieces, 80/10/10) plus sentence-order prediction.

    corpus: text files/folders (.txt, .txt.gz, .jsonl, GCIDE .dict.dz).
    tokenizer: tokenizer.json / vocab.txt; None trains a WordPiece tokenizer of
        `vocab_size` on the corpus and saves it as OUT/tokenizer.json.
    """

    corpus: list[str] = field(default_factory=list)
    max_documents: int | None = None  # use only the first N documents of the corpus
    vocab_size: int = 8000
    seq_len: int = 128
    max_steps: int | None = 1000
    mask_prob: float = 0.15
    sop_weight: float = 1.0
    eval_examples: int = 512
    eval_every: int | None = None
    cache_dir: str | None = None

    RESUME_FREE: ClassVar[tuple[str, ...]] = TextRunConfig.RESUME_FREE + ("cache_dir", "eval_every")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.corpus:
            raise ValueError("no corpus given: pass one or more text files or folders with --corpus")
        self.corpus = [str(p) for p in self.corpus]
        _positive(self, "vocab_size", "seq_len", "eval_examples")
        _positive(self, "eval_every", "max_documents", optional=True)
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be >= 8 (room for [CLS] A [SEP] B [SEP]), got {self.seq_len}")
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.sop_weight < 0:
            raise ValueError(f"sop_weight must be >= 0, got {self.sop_weight}")


@dataclass
class FinetuneConfig(TextRunConfig):
    """Sequence classification (GLUE-style files) or span QA (SQuAD JSON) from a pretrained checkpoint.

    init: a pretraining checkpoint (checkpoint folder or run folder); the
        model preset and sizes come from it, the task head is new.
    The defaults follow the paper's fine-tuning recipes scaled down (lr 5e-5
    suits the paper's base models; small models want more, e.g. 5e-4).
    """

    task: str = "classify"
    init: str = ""
    train: str = ""
    validation: str = ""
    epochs: int = 3
    lr: float = 5e-4
    max_len: int | None = None
    doc_stride: int = 128
    max_query_len: int = 64
    null_threshold: float = 0.0

    RESUME_FREE: ClassVar[tuple[str, ...]] = TextRunConfig.RESUME_FREE + ("null_threshold",)

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice(self, "task", TASK_NAMES)
        for name in ("init", "train", "validation"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required for fine-tuning")
        _positive(self, "doc_stride", "max_query_len")
        _positive(self, "max_len", optional=True)

