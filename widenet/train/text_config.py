"""Settings for text pretraining (`widenet pretrain`) and fine-tuning (`widenet finetune`).

Both are saved in every checkpoint; `--resume` refuses a changed setting that
would alter training (anything outside the class's `RESUME_FREE` names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .config import RecipeConfig, _choice, _positive

TASK_NAMES = ("classify", "qa")
PRETRAIN_STEPS = 1000  # pretraining's default length


@dataclass
class TextRunConfig(RecipeConfig):
    """What every text run shares (the recipe of RecipeConfig with text defaults) plus the tokenizer."""

    model: str = "widenet_text_tiny"
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 64
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    schedule: str = "linear"
    out: str = "runs/text"
    tokenizer: str | None = None

    RESUME_FREE: ClassVar[tuple[str, ...]] = RecipeConfig.RESUME_FREE + ("tokenizer",)


@dataclass
class PretrainConfig(TextRunConfig):
    """Masked-LM (15% of word pieces, 80/10/10) plus sentence-order prediction.

    corpus: text files/folders (.txt, .txt.gz, .jsonl, GCIDE .dict.dz).
    tokenizer: tokenizer.json / vocab.txt; None trains a WordPiece tokenizer of
        `vocab_size` on the corpus and saves it as OUT/tokenizer.json.
    init: continue from this text model (a run, a widenet folder such as an
        upcycled ALBERT, a Hugging Face ALBERT/BERT folder): its config,
        weights and tokenizer (unless `tokenizer` is given); `model` is ignored.
    """

    corpus: list[str] = field(default_factory=list)
    init: str | None = None
    INIT_CONTINUES: ClassVar[bool] = True
    max_documents: int | None = None  # use only the first N documents of the corpus
    vocab_size: int = 8000
    seq_len: int = 128
    max_steps: int | None = PRETRAIN_STEPS  # yields to a time_budget
    mask_prob: float = 0.15
    sop_weight: float = 1.0
    eval_examples: int = 512
    eval_every: int | None = None
    cache_dir: str | None = None

    RESUME_FREE: ClassVar[tuple[str, ...]] = TextRunConfig.RESUME_FREE + ("cache_dir", "eval_every")

    def __post_init__(self) -> None:
        if self.time_budget is not None and self.max_steps == PRETRAIN_STEPS:
            self.max_steps = None  # the budget decides the length
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

    init: the pretrained text model (a run, a checkpoint, a widenet or Hugging
        Face folder); the model preset, sizes and tokenizer come from it, the
        task head is new.
    scratch: the same model and tokenizer from random weights (the baseline
        that shows what pretraining transfers).
    The defaults follow the paper's fine-tuning recipes scaled down (lr 5e-5
    suits the paper's base models; small models want more, e.g. 5e-4).
    """

    task: str = "classify"
    init: str = ""
    scratch: bool = False
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

