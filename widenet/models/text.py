"""Text models of WideNet's NLP half: an ALBERT-style encoder with task heads.

    input_ids (B, T) -> TextEmbeddings: word + position + token type, LayerNorm,
    dropout, Linear E -> D (ALBERT's factorized embedding) -> Encoder (sharing
    by EncoderConfig: ALBERT, BERT, WideNet) -> hidden (B, T, D)
    -> pooler: tanh(Linear(hidden[:, 0])) on the [CLS] token -> pooled (B, D)
    -> heads by task:
        "pretrain": masked-LM (decoder tied to the word embedding unless
                    tie_word_embeddings=False) + sentence order
        "classify": dropout + Linear pooled -> num_labels (MNLI, SST-2)
        "qa":       Linear D -> 2, start / end logits per token (SQuAD)

Shape legend:
    B batch   T tokens per sequence   D encoder width   E embedding size
    V vocabulary   M masked positions in the batch (rows of mlm_logits)

Padding: `padding_mask` is (B, T) bool, True where a token is padding; left
None it is derived as `input_ids == pad_token_id`. Padding keys are masked in
attention and padding tokens take no part in MoE routing, so appending padding
does not change the outputs at real positions.

Init (`reset_parameters`): Xavier-uniform weights and zero biases for every
Linear (as the vision model: normal(0.02) starves narrow models), normal(0.02)
for the embedding tables with the padding row zeroed, LayerNorms at 1 / 0. The
heads use Xavier too (no zero init), and the MLM output bias starts at zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..layers.experts import gelu_approximation
from ..layers.masks import resolve_padding_mask
from ..layers.moe import RoutingStats
from ..listing import listed
from ..memory import check_model_fits
from ..settings import SettingTypeError, check_types
from .encoder import Encoder, EncoderConfig

TASKS = ("pretrain", "classify", "qa")
SPAN_MASK_VALUE = -1e4  # logit of padding positions in the span head (exp() underflows to 0)

__all__ = ["TASKS", "TextConfig", "TextEmbeddings", "TextBackbone", "BackboneOutput", "MaskedLMHead",
           "PooledHead", "SentenceOrderHead", "SpanHead", "TextTransformer", "TextOutput", "load_backbone"]


# ----------------------------------------------------------------------------
# Config and outputs
# ----------------------------------------------------------------------------
@dataclass
class TextConfig:
    """Vocabulary, embedding and task settings; `encoder` holds sizes and sharing.

    vocab_size: V token ids 0..V-1.   embedding_size: E, the factorized
    embedding width (projected to the encoder width D).   max_positions: the
    longest sequence (learned position table).   type_vocab_size: segment ids
    (sentence A / B).   pad_token_id: the id of padding (its embedding row is
    zero and it is masked by default).   task: "pretrain" (MLM + SOP),
    "classify" (num_labels classes) or "qa" (span start / end).
    encoder: an EncoderConfig or a dict of its fields.
    """

    vocab_size: int = 30000
    embedding_size: int = 128
    max_positions: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    task: str = "pretrain"
    num_labels: int = 2
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig.from_dict(self.encoder)
        if not isinstance(self.encoder, EncoderConfig):
            raise SettingTypeError(f"encoder must be an EncoderConfig or a dict of its settings, got {self.encoder!r}")
        check_types(self)
        for name in ("vocab_size", "embedding_size", "max_positions", "type_vocab_size", "num_labels"):
            _check_positive_int(name, getattr(self, name))
        pad = self.pad_token_id
        if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < self.vocab_size:
            raise ValueError(f"pad_token_id must be an id in 0..{self.vocab_size - 1} "
                             f"(vocab_size {self.vocab_size}), got {pad!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "classify" and self.num_labels < 2:  # (Hugging Face's num_labels=1 is a regression)
            raise ValueError("num_labels must be at least 2 for task='classify': a softmax over one label has a "
                             "loss of 0 and learns nothing")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BackboneOutput:
    """hidden: (B, T, D) last encoder output; pooled: (B, D) tanh pooler on [CLS];
    aux_loss: () summed MoE loss; routing: per block, RoutingStats or None;
    padding_mask: (B, T) bool, the mask used (True = padding);
    hidden_states: per block output (B, T, D) when asked for, else None."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    aux_loss: torch.Tensor
    routing: list[RoutingStats | None]
    padding_mask: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None


@dataclass
class TextOutput:
    """Backbone results plus the outputs of the model's task heads (others None).

    mlm_logits: (M, V) at the masked positions, rows in row-major order of the
        (B, T) mask (None without masked_positions).   sop_logits: (B, 2).
    logits: (B, num_labels) for "classify".
    start_logits / end_logits: (B, T) for "qa"; padding positions hold
        SPAN_MASK_VALUE; position 0 ([CLS]) is the no-answer option.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor
    aux_loss: torch.Tensor
    routing: list[RoutingStats | None]
    hidden_states: list[torch.Tensor] | None = None
    mlm_logits: torch.Tensor | None = None
    sop_logits: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None


# ----------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------
class TextEmbeddings(nn.Module):
    """ALBERT's factorized embedding: ids (B, T) -> tokens (B, T, D).

    word (V x E, padding_idx: looking up padding adds no gradient to its row)
    + learned position (P x E)
    + token type (types x E), LayerNorm(E), dropout, then Linear E -> D. The
    projection is kept even when E == D, so every config has the same modules.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        emb = cfg.embedding_size
        self.word = nn.Embedding(cfg.vocab_size, emb, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_positions, emb)
        self.token_type = nn.Embedding(cfg.type_vocab_size, emb)
        self.norm = nn.LayerNorm(emb, eps=cfg.encoder.norm_eps)
        self.drop = nn.Dropout(cfg.encoder.dropout)
        self.project = nn.Linear(emb, cfg.encoder.dim)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """input_ids, token_type_ids: (B, T) long -> (B, T, D)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)  # (B, T, E)
        return self.project(self.drop(self.norm(x)))


class TextBackbone(nn.Module):
    """Embeddings + Encoder + pooler (Linear D -> D, tanh, on the first token)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg.encoder)
        self.pooler = nn.Linear(cfg.encoder.dim, cfg.encoder.dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier Linear weights, zero biases; normal(0.02) embeddings, zero padding row."""
        _xavier_linears(self)
        for table in (self.embeddings.word, self.embeddings.position, self.embeddings.token_type):
            nn.init.normal_(table.weight, std=0.02)
        with torch.no_grad():
            self.embeddings.word.weight[self.cfg.pad_token_id].zero_()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None,
                return_hidden_states: bool = False, *, keep_mask: torch.Tensor | None = None) -> BackboneOutput:
        """input_ids (B, T) long; token_type_ids (B, T) (None: zeros);
        padding_mask (B, T) bool, True = padding, or keep_mask (B, T), 1 = a real token
        (Hugging Face's attention_mask); neither: input_ids == pad_token_id."""
        token_type_ids, padding_mask = self._check_inputs(input_ids, token_type_ids, padding_mask, keep_mask)
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, D)
        enc = self.encoder(x, padding_mask, return_hidden_states=return_hidden_states)
        pooled = torch.tanh(self.pooler(enc.hidden[:, 0]))  # (B, D)
        return BackboneOutput(enc.hidden, pooled, enc.aux_loss, enc.routing, padding_mask, enc.hidden_states)

    def _check_inputs(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                      padding_mask: torch.Tensor | None, keep_mask: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the inputs; fill in the default token types and padding mask."""
        cfg = self.cfg
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        t = input_ids.shape[1]
        if t == 0:
            raise ValueError("input_ids has no tokens (sequence length 0)")
        if t > cfg.max_positions:
            raise ValueError(f"sequence length {t} exceeds max_positions={cfg.max_positions}; "
                             "truncate the input or build the model with a larger max_positions")
        _check_id_range("input_ids", input_ids, cfg.vocab_size, "vocab_size")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            _check_same_shape("token_type_ids", token_type_ids, input_ids)
            _check_id_range("token_type_ids", token_type_ids, cfg.type_vocab_size, "type_vocab_size")
        padding_mask = resolve_padding_mask(input_ids.shape, padding_mask, keep_mask)
        if padding_mask is None:
            padding_mask = input_ids == cfg.pad_token_id
        return token_type_ids, padding_mask


# ----------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------
class MaskedLMHead(nn.Module):
    """hidden (M, D) -> logits (M, V): Linear D -> E, GELU, LayerNorm(E), then the
    decoder: a matmul with a (V, E) table plus an own bias (V,).

    Tied (the default): the table is the word embedding, passed to forward rather
    than stored (same tensor, one state-dict key, gradients from both uses).
    Untied: the head holds its own `decoder` (V, E) and ignores the one passed.
    """

    def __init__(self, dim: int, embedding_size: int, vocab_size: int, eps: float = 1e-6,
                 activation: str = "gelu", tied: bool = True) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, embedding_size)
        self.act = nn.GELU(approximate=gelu_approximation(activation))
        self.norm = nn.LayerNorm(embedding_size, eps=eps)
        self.decoder = None if tied else nn.Parameter(torch.empty(vocab_size, embedding_size))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, word_embedding: torch.Tensor) -> torch.Tensor:
        """hidden (..., D), word_embedding (V, E) -> logits (..., V)."""
        h = self.norm(self.act(self.dense(hidden)))  # (..., E)
        table = word_embedding if self.decoder is None else self.decoder
        return h @ table.t() + self.bias


class PooledHead(nn.Module):
    """Dropout + Linear on the pooled [CLS] vector: (B, D) -> (B, num_outputs)."""

    def __init__(self, dim: int, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, num_outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(pooled))


class SentenceOrderHead(PooledHead):
    """ALBERT's sentence-order prediction: pooled (B, D) -> (B, 2) (in order / swapped)."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__(dim, 2, dropout)


class SpanHead(nn.Module):
    """Extractive QA: hidden (B, T, D) -> start_logits, end_logits (B, T).

    As in BERT, SQuAD 2.0's "no answer" is the span (0, 0), the [CLS] token at
    position 0: there is no separate output for it. Padding positions get
    SPAN_MASK_VALUE so that a softmax over positions never picks them.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2)

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.proj(hidden)  # (B, T, 2)
        if padding_mask is not None:
            logits = logits.masked_fill(padding_mask.unsqueeze(-1), SPAN_MASK_VALUE)
        start, end = logits.unbind(-1)  # (B, T) each
        return start, end


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------
class TextTransformer(nn.Module):
    """ALBERT / BERT / WideNet text model: `backbone` plus the heads of cfg.task.

    pretrain: mlm_head (MaskedLMHead) + sop_head (SentenceOrderHead);
    classify: classifier (PooledHead -> num_labels); qa: span_head (SpanHead).
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        check_model_fits(lambda: TextTransformer(cfg))  # before any weight is allocated
        self.cfg = cfg
        enc = cfg.encoder
        self.backbone = TextBackbone(cfg)
        if cfg.task == "pretrain":
            self.mlm_head = MaskedLMHead(enc.dim, cfg.embedding_size, cfg.vocab_size, enc.norm_eps, enc.activation,
                                         tied=cfg.tie_word_embeddings)
            self.sop_head = SentenceOrderHead(enc.dim, enc.dropout)
        elif cfg.task == "classify":
            self.classifier = PooledHead(enc.dim, cfg.num_labels, enc.dropout)
        else:
            self.span_head = SpanHead(enc.dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Backbone init (see TextBackbone), Xavier head weights, zero head biases; an
        untied MLM decoder is drawn like the word embedding (normal, std 0.02)."""
        self.backbone.reset_parameters()
        for name, child in self.named_children():
            if name != "backbone":
                _xavier_linears(child)
        if self.cfg.task == "pretrain":
            nn.init.zeros_(self.mlm_head.bias)
            if self.mlm_head.decoder is not None:
                nn.init.normal_(self.mlm_head.decoder, std=0.02)

    @property
    def untrained_parameters(self) -> tuple[str, ...]:
        """Names of the weights this task's loss never reaches: a span head reads the tokens, not the
        pooled [CLS] (data parallelism leaves them out of its gradient all-reduce)."""
        return ("backbone.pooler.weight", "backbone.pooler.bias") if self.cfg.task == "qa" else ()

    @property
    def word_embedding(self) -> torch.Tensor:
        """The (V, E) word-embedding table, also the MLM decoder's weight when tied."""
        return self.backbone.embeddings.word.weight

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, masked_positions: torch.Tensor | None = None,
                return_hidden_states: bool = False, *, keep_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> TextOutput:
        """input_ids (B, T); token_type_ids (B, T) or None (zeros); padding_mask (B, T)
        bool, True = padding, or keep_mask (B, T), 1 = a real token (Hugging Face's
        attention_mask, also taken by that name; neither: input_ids == pad_token_id);
        masked_positions (B, T) bool: where to compute MLM logits (pretrain only)."""
        if attention_mask is not None:
            if keep_mask is not None:
                raise ValueError("give keep_mask or attention_mask (the same mask: 1 = a real token), not both")
            keep_mask = attention_mask
        if masked_positions is not None and self.cfg.task != "pretrain":
            raise ValueError(f"masked_positions needs a task='pretrain' model, this one is {self.cfg.task!r}")
        if masked_positions is not None:
            _check_same_shape("masked_positions", masked_positions, input_ids)
            if masked_positions.dtype != torch.bool:
                raise ValueError(f"masked_positions must be a bool mask, got dtype {masked_positions.dtype}")
        feats = self.backbone(input_ids, token_type_ids, padding_mask, return_hidden_states, keep_mask=keep_mask)
        out = TextOutput(feats.hidden, feats.pooled, feats.aux_loss, feats.routing, feats.hidden_states)
        task = self.cfg.task
        if task == "pretrain":
            out.sop_logits = self.sop_head(feats.pooled)
            if masked_positions is not None:
                out.mlm_logits = self.mlm_head(feats.hidden[masked_positions], self.word_embedding)  # (M, V)
        elif task == "classify":
            out.logits = self.classifier(feats.pooled)
        else:
            out.start_logits, out.end_logits = self.span_head(feats.hidden, feats.padding_mask)
        return out


def load_backbone(model: TextTransformer, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy the `backbone.*` tensors of a (pretraining) state dict into `model`.

    The heads stay as they are (freshly initialised for a classify / qa model).
    Raises ValueError naming missing or unexpected backbone keys and tensors
    whose shapes differ (vocabulary, embedding size, width, positions...);
    TypeError if `model` is not a TextTransformer.
    """
    if not isinstance(getattr(model, "backbone", None), TextBackbone):
        raise TypeError(f"load_backbone needs a TextTransformer, got {type(model).__name__}")
    prefix = "backbone."
    ckpt = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not ckpt:
        raise ValueError("the state dict has no 'backbone.*' tensors: is it a TextTransformer's?")
    own = model.backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(ckpt)), sorted(set(ckpt) - set(own))
    if missing or unexpected:
        parts = [f"{label} backbone keys: {listed(keys)}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ValueError("checkpoint does not fit the model's backbone (different sharing or depth?); "
                         + "; ".join(parts))
    for key, tensor in ckpt.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(_shape_mismatch(key, tuple(tensor.shape), tuple(own[key].shape)))
    model.backbone.load_state_dict(ckpt, strict=True)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_same_shape(name: str, tensor: torch.Tensor, input_ids: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(input_ids.shape):
        raise ValueError(f"{name} shape {tuple(tensor.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")


def _check_id_range(name: str, ids: torch.Tensor, size: int, size_name: str) -> None:
    """Ids must lie in 0..size-1 (checked on the values, so it syncs with the device; skipped
    inside torch.compile, where the embedding lookup's own bound check remains)."""
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    if ids.numel() and ids.device.type != "meta" and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= size:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds id {bad}, outside 0..{size - 1} ({size_name}={size})")


_SHAPE_NAMES = {
    "embeddings.word.weight": ("vocabulary", 0),
    "embeddings.position.weight": ("max_positions", 0),
    "embeddings.token_type.weight": ("type_vocab_size", 0),
}


def _shape_mismatch(key: str, ckpt_shape: tuple, own_shape: tuple) -> str:
    """A message for a backbone tensor whose shape differs, naming the setting when known."""
    if key in _SHAPE_NAMES and ckpt_shape[1:] == own_shape[1:]:
        what, axis = _SHAPE_NAMES[key]
        return f"checkpoint {what} {ckpt_shape[axis]} does not match the model's {own_shape[axis]}"
    table = key.startswith("embeddings.") and key != "embeddings.project.weight"
    if table and ckpt_shape[-1] != own_shape[-1]:
        return f"checkpoint embedding_size {ckpt_shape[-1]} does not match the model's {own_shape[-1]}"
    return f"backbone.{key}: checkpoint shape {ckpt_shape} does not match the model's {own_shape}"


def _xavier_linears(module: nn.Module) -> None:
    """Xavier-uniform weight and zero bias for every nn.Linear inside `module`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
