"""ALBERT pretraining examples: sentence-order pairs and BERT masking.

:func:`make_sop_examples` packs sentence pairs into fixed-length
``[CLS] A [SEP] B [SEP]`` sequences with sentence-order labels;
:func:`mask_tokens` applies BERT's 80/10/10 masking to a batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .corpus import PretrainCorpus
from .documents import CorpusError
from .tokenizer import SpecialIds

__all__ = ["SOPExamples", "make_sop_examples", "mask_tokens"]


_IGNORE_INDEX = -100


@dataclass
class SOPExamples:
    """Packed ``[CLS] A [SEP] B [SEP] [PAD]...`` sequences with sentence-order labels.

    ``input_ids`` int64 ``(N, T)``; ``token_type_ids`` int64 ``(N, T)``: 0 for
    ``[CLS] A [SEP]`` (and padding), 1 for ``B [SEP]``; ``sop_labels`` int64
    ``(N,)``: 1 when the two segments were swapped, 0 in original order.
    """

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    sop_labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.sop_labels)

    def fill_ratio(self, pad_id: int) -> float:
        """Mean fraction of each sequence that is not padding."""
        if len(self) == 0:
            return 0.0
        return float((self.input_ids != pad_id).float().mean())


def _truncation(len_a: int, len_b: int, max_total: int) -> tuple[int, int]:
    """How many tokens to cut from A and from B: always from the longer (B on ties)."""
    excess = len_a + len_b - max_total
    if excess <= 0:
        return 0, 0
    if len_a > len_b:
        cut_a, cut_b = min(excess, len_a - len_b), 0
    else:
        cut_a, cut_b = 0, min(excess, len_b - len_a)
    rest = excess - cut_a - cut_b
    return cut_a + rest // 2, cut_b + (rest + 1) // 2


def _cut(span: tuple[int, int], count: int, rng: np.random.Generator) -> tuple[int, int]:
    """Remove ``count`` tokens from ``span``, each from the front or the back at random."""
    if count == 0:
        return span
    front = int(rng.binomial(count, 0.5))
    return span[0] + front, span[1] - (count - front)


def _chunk_pair(
    starts: np.ndarray, first: int, last: int, rng: np.random.Generator
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Token spans of segments A and B of the sentences ``first..last`` (inclusive)."""
    begin, end = int(starts[first]), int(starts[last + 1])
    if last > first:
        split = int(starts[rng.integers(first + 1, last + 1)])
    elif end - begin >= 2:
        split = int(rng.integers(begin + 1, end))
    else:
        return None
    return (begin, split), (split, end)


def _document_pairs(
    starts: np.ndarray, first: int, stop: int, max_tokens: int, short_seq_prob: float, rng: np.random.Generator
) -> Iterator[tuple[tuple[int, int], tuple[int, int], int]]:
    """(first span, second span, label) for each chunk of sentences ``first..stop-1`` of one document."""

    def target() -> int:
        return int(rng.integers(2, max_tokens + 1)) if rng.random() < short_seq_prob else max_tokens

    goal, chunk_first, length = target(), first, 0
    for sentence in range(first, stop):
        length += int(starts[sentence + 1] - starts[sentence])
        if sentence < stop - 1 and length < goal:
            continue
        pair = _chunk_pair(starts, chunk_first, sentence, rng)
        goal, chunk_first, length = target(), sentence + 1, 0
        if pair is None:
            continue
        span_a, span_b = pair
        cut_a, cut_b = _truncation(span_a[1] - span_a[0], span_b[1] - span_b[0], max_tokens)
        span_a, span_b = _cut(span_a, cut_a, rng), _cut(span_b, cut_b, rng)
        if rng.random() < 0.5:
            yield span_b, span_a, 1
        else:
            yield span_a, span_b, 0


def _split_long_sentences(starts: np.ndarray, documents: np.ndarray, max_tokens: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Sentence and document offsets with every sentence longer than max_tokens cut into pieces of
    max_tokens (the last one shorter): a chunk holding such a sentence would otherwise be trimmed
    to one sequence and the rest of the sentence lost (text without sentence punctuation is one
    long sentence). starts (S+1,) token offsets, documents (D+1,) sentence offsets."""
    lengths = np.diff(starts)  # (S,)
    pieces = np.maximum(-(-lengths // max_tokens), 1)  # (S,) ceil, an empty sentence stays one
    if (pieces == 1).all():
        return starts, documents
    first_piece = np.concatenate([[0], np.cumsum(pieces)])  # (S+1,) each sentence's first piece
    piece = np.arange(first_piece[-1]) - np.repeat(first_piece[:-1], pieces)  # (P,) index within its sentence
    new_starts = np.repeat(starts[:-1], pieces) + piece * max_tokens  # (P,)
    return np.append(new_starts, starts[-1]), first_piece[documents]


def _pack(
    tokens: np.ndarray, pairs: list[tuple[tuple[int, int], tuple[int, int], int]], seq_len: int, special: SpecialIds
) -> SOPExamples:
    """Lay the pairs out as ``[CLS] first [SEP] second [SEP]`` padded to ``seq_len``."""
    count = len(pairs)
    input_ids = np.full((count, seq_len), special.pad, dtype=np.int64)
    type_ids = np.zeros((count, seq_len), dtype=np.int64)
    labels = np.zeros(count, dtype=np.int64)
    for row, ((a0, a1), (b0, b1), label) in enumerate(pairs):
        len_a, len_b = a1 - a0, b1 - b0
        line = input_ids[row]
        line[0] = special.cls
        line[1 : 1 + len_a] = tokens[a0:a1]
        line[1 + len_a] = special.sep
        line[2 + len_a : 2 + len_a + len_b] = tokens[b0:b1]
        line[2 + len_a + len_b] = special.sep
        type_ids[row, 2 + len_a : 3 + len_a + len_b] = 1
        labels[row] = label
    return SOPExamples(torch.from_numpy(input_ids), torch.from_numpy(type_ids), torch.from_numpy(labels))


def make_sop_examples(
    corpus: PretrainCorpus,
    seq_len: int,
    seed: int,
    special: SpecialIds,
    short_seq_prob: float = 0.1,
) -> SOPExamples:
    """ALBERT-style sentence-order examples from every document of ``corpus``.

    Each document is walked sentence by sentence (one longer than ``seq_len - 3``
    tokens counts as pieces of that length); consecutive sentences are
    gathered until they reach ``seq_len - 3`` tokens (or, with probability
    ``short_seq_prob``, a random shorter target) and the chunk is split at a
    random sentence boundary into A and B (a one-sentence chunk at a random
    token). With probability 0.5 B comes first (label 1). The longer segment
    is trimmed, from the front or the back at random, until the pair fits.
    Deterministic for a given ``seed``.
    """
    if seq_len < 5:
        raise ValueError(f"seq_len must be at least 5 ([CLS] a [SEP] b [SEP]), got {seq_len}")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"short_seq_prob must be in [0, 1], got {short_seq_prob}")
    rng = np.random.default_rng(seed)
    tokens = corpus.tokens.numpy()
    starts, documents = _split_long_sentences(corpus.sentence_offsets.numpy(), corpus.document_offsets.numpy(),
                                              seq_len - 3)
    pairs = []
    for doc in range(corpus.num_documents):
        pairs.extend(
            _document_pairs(starts, int(documents[doc]), int(documents[doc + 1]), seq_len - 3, short_seq_prob, rng)
        )
    if not pairs:
        raise CorpusError(
            f"no sentence-order example could be made: all {corpus.num_documents} documents have fewer than 2 tokens"
        )
    return _pack(tokens, pairs, seq_len, special)


# --------------------------------------------------------------------------
# Masked language modelling
# --------------------------------------------------------------------------


def _random_regular_ids(
    shape: tuple[int, ...], special: SpecialIds, vocab_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Uniform random ids in ``[0, vocab_size)`` that are not special tokens."""
    specials = sorted({index for index in special.as_tuple() if 0 <= index < vocab_size})
    if vocab_size - len(specials) < 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no regular (non-special) token")
    ids = torch.randint(0, vocab_size - len(specials), shape, generator=generator, device=generator.device)
    for index in specials:  # ascending: shift past each special id in turn
        ids = ids + (ids >= index).long()
    return ids


def mask_tokens(
    input_ids: torch.Tensor,
    special: SpecialIds,
    vocab_size: int,
    generator: torch.Generator,
    mask_prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a batch ``input_ids`` (B, T) int64; returns ``(masked_ids, labels)``.

    In every sequence, ``round(mask_prob * n)`` of its ``n`` regular tokens
    (never a special token or padding; at least one when ``n > 0``) are chosen.
    Of those, 80% become ``[MASK]``, 10% a random regular token and 10% stay.
    ``labels`` (B, T) holds the original id at chosen positions and -100
    elsewhere. Only ``generator`` supplies randomness.
    """
    if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        raise ValueError(
            f"input_ids must be an int64 tensor of shape (B, T), got {input_ids.dtype} {tuple(input_ids.shape)}"
        )
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    device = input_ids.device
    shape = tuple(input_ids.shape)
    maskable = torch.ones(shape, dtype=torch.bool, device=device)
    for index in special.as_tuple():
        maskable &= input_ids != index
    counts = maskable.sum(dim=1)  # (B,)
    wanted = torch.where(
        counts > 0, (counts.double() * mask_prob).round().clamp_min(1), torch.zeros_like(counts.double())
    )
    scores = torch.rand(shape, generator=generator, device=generator.device).to(device)
    scores = scores.masked_fill(~maskable, 2.0)  # never chosen before a regular token
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, T): position in the random order
    chosen = (rank < wanted.long().unsqueeze(1)) & maskable
    action = torch.rand(shape, generator=generator, device=generator.device).to(device)
    random_ids = _random_regular_ids(shape, special, vocab_size, generator).to(device)
    masked = input_ids.clone()
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, special.mask), masked)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, _IGNORE_INDEX))
    return masked, labels
