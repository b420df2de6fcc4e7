"""Text corpora for ALBERT-style pretraining: masked LM plus sentence order.

The pipeline is

1. :func:`iter_documents` reads documents from ``.txt`` / ``.txt.gz`` / ``.gz``
   files (documents separated by blank lines), ``.jsonl`` / ``.jsonl.gz`` files
   (one ``{"text": ...}`` object per line), GCIDE dictionaries (``*.dict.dz``,
   one document per entry) and folders of such files;
2. :func:`load_pretrain_corpus` splits every document into sentences
   (:func:`split_sentences`), tokenizes them into one compact
   :class:`PretrainCorpus` and caches it, keyed by the files and the
   tokenizer's vocabulary;
3. :func:`make_sop_examples` packs sentence pairs into fixed-length
   ``[CLS] A [SEP] B [SEP]`` sequences with sentence-order labels, and
4. :func:`mask_tokens` applies BERT masking to a batch.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import re
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from widenet.files import save_atomic
from widenet.data.gcide import GcideError, gcide_documents
from widenet.text.tokenizer import SpecialIds, vocab_fingerprint

__all__ = [
    "CorpusError",
    "CORPUS_SUFFIXES",
    "PretrainCorpus",
    "SOPExamples",
    "corpus_files",
    "iter_documents",
    "split_sentences",
    "load_pretrain_corpus",
    "make_sop_examples",
    "mask_tokens",
]

PathLike = str | os.PathLike

CORPUS_SUFFIXES = (".txt", ".txt.gz", ".gz", ".jsonl", ".jsonl.gz", ".dict.dz")
_LOOKED_FOR = ", ".join(f"*{suffix}" for suffix in CORPUS_SUFFIXES)

# Bump when sentence splitting, reading or the cache layout changes.
_CORPUS_CACHE_VERSION = 2
_IGNORE_INDEX = -100


class CorpusError(ValueError):
    """A corpus path is missing, unreadable, malformed or holds no text."""


# --------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------


def _file_kind(path: Path) -> str | None:
    """ "text", "jsonl" or "gcide" from the file name, None when unsupported."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".dict.dz"):
        return "gcide"
    if name.endswith((".txt", ".gz")):
        return "text"
    return None


def _as_path_list(paths: Sequence[PathLike] | PathLike) -> list[Path]:
    """A single path or a sequence of them as a list of Paths."""
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(path) for path in paths]


def _folder_files(folder: Path) -> list[Path]:
    """Usable corpus files under ``folder``, recursively, sorted, hidden ones skipped."""
    files = [
        path
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and _file_kind(path) is not None
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    if not files:
        raise CorpusError(f"{folder}: folder has no corpus files (looked for {_LOOKED_FOR}, recursively)")
    return files


def corpus_files(paths: Sequence[PathLike] | PathLike) -> list[Path]:
    """The corpus files named by ``paths`` (files, or folders searched recursively)."""
    path_list = _as_path_list(paths)
    if not path_list:
        raise CorpusError("no corpus paths given")
    files: list[Path] = []
    for path in path_list:
        if path.is_dir():
            files.extend(_folder_files(path))
        elif path.is_file():
            if _file_kind(path) is None:
                raise CorpusError(f"{path}: unsupported corpus file type (expected one of {_LOOKED_FOR})")
            files.append(path)
        else:
            raise CorpusError(f"{path}: corpus path not found (expected a folder or a {_LOOKED_FOR} file)")
    return files


def _open_text(path: Path) -> Any:
    """A UTF-8 text handle on ``path``, gunzipping ``*.gz`` files."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _text_documents(path: Path) -> Iterator[str]:
    """Documents of a plain-text file: runs of lines separated by blank lines."""
    lines: list[str] = []
    with _open_text(path) as handle:
        for line in handle:
            if line.strip():
                lines.append(line.rstrip("\r\n"))
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def _jsonl_documents(path: Path) -> Iterator[str]:
    """The ``"text"`` field of every line of a JSON-lines file."""
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{number}: invalid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CorpusError(f'{path}:{number}: expected a JSON object with a string "text" field')
            yield record["text"]


def _file_documents(path: Path) -> Iterator[str]:
    """Documents of one corpus file, with read errors turned into CorpusError."""
    kind = _file_kind(path)
    try:
        if kind == "gcide":
            yield from gcide_documents(path)
        elif kind == "jsonl":
            yield from _jsonl_documents(path)
        else:
            yield from _text_documents(path)
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start} of a chunk)") from None
    except GcideError as exc:
        raise CorpusError(str(exc)) from None
    except (OSError, EOFError, zlib.error) as exc:
        raise CorpusError(f"{path}: cannot read file ({exc})") from None


def iter_documents(paths: Sequence[PathLike] | PathLike) -> Iterator[str]:
    """Yield every non-empty document of the corpus named by ``paths``, in order.

    Raises CorpusError for a missing path, a folder without corpus files, a
    malformed file (naming ``file:line`` for JSON lines) or a corpus without
    any text.
    """
    files = corpus_files(paths)
    found = 0
    for path in files:
        for document in _file_documents(path):
            document = document.strip()
            if document:
                found += 1
                yield document
    if not found:
        names = ", ".join(str(path) for path in files[:5]) + (" ..." if len(files) > 5 else "")
        raise CorpusError(f"no text found in the corpus ({names}); looked for documents in {_LOOKED_FOR} files")


# --------------------------------------------------------------------------
# Sentence splitting
# --------------------------------------------------------------------------

# Terminal punctuation, closing quotes/brackets, then the whitespace after it.
_BOUNDARY = re.compile(r"([.!?]+)[\"'\u201d\u2019)\]]*(\s+)")
_OPENERS = "\"'\u201c\u2018([0123456789"
_ABBREVIATIONS = frozenset(
    "e.g. i.e. mr. mrs. ms. dr. st. prof. sr. jr. vs. cf. viz. al. fig. figs. vol. vols. "
    "pp. p. ch. sec. approx. ca. esp. inc. ltd. co. mt. ft. gen. col. capt. lt. sgt. rev. hon. gov. "
    "sen. rep. jan. feb. mar. apr. jun. jul. aug. sep. sept. oct. nov. dec.".split()
)
_INITIAL = re.compile(r"[A-Z]\.")
_DOTTED = re.compile(r"(?:[A-Za-z]\.){2,}")


def _is_abbreviation(text: str, period: int) -> bool:
    """Whether the word ending with the period at ``text[period]`` is an abbreviation."""
    start = period
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start : period + 1].lstrip("\"'\u201c\u2018([-")
    return word.lower() in _ABBREVIATIONS or bool(_INITIAL.fullmatch(word) or _DOTTED.fullmatch(word))


def _is_boundary(text: str, match: re.Match[str]) -> bool:
    """Whether the punctuation + whitespace in ``match`` ends a sentence."""
    following = text[match.end() : match.end() + 1]
    if not following:
        return False
    at_line_end = "\n" in match.group(2)
    if not (at_line_end or following.isupper() or following in _OPENERS):
        return False
    if match.group(1) == ".":
        return not _is_abbreviation(text, match.start())
    return True


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences with whitespace collapsed; empty pieces dropped.

    A sentence ends after ``.``, ``!`` or ``?`` (plus closing quotes/brackets)
    that is followed by whitespace and an uppercase letter, a digit, a quote or
    an opening bracket, or that ends a line. A period after a common
    abbreviation ("e.g.", "Mr.", "Dr.", "St.", ...) or a single capital
    initial ("J.") does not end a sentence.
    """
    pieces: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if _is_boundary(text, match):
            pieces.append(text[start : match.start(2)])
            start = match.end()
    pieces.append(text[start:])
    return [sentence for sentence in (" ".join(piece.split()) for piece in pieces) if sentence]


# --------------------------------------------------------------------------
# The tokenized corpus and its cache
# --------------------------------------------------------------------------


@dataclass
class PretrainCorpus:
    """A tokenized corpus held compactly.

    ``tokens`` int32 ``(num_tokens,)``: every word-piece id, no special tokens;
    ``sentence_offsets`` int64 ``(num_sentences + 1,)``: sentence ``i`` is
    ``tokens[sentence_offsets[i]:sentence_offsets[i + 1]]``;
    ``document_offsets`` int64 ``(num_documents + 1,)``: document ``d`` is
    sentences ``document_offsets[d]`` to ``document_offsets[d + 1] - 1``;
    ``vocab_fingerprint``: :func:`widenet.text.tokenizer.vocab_fingerprint`
    of the tokenizer that made the ids.
    """

    tokens: torch.Tensor
    sentence_offsets: torch.Tensor
    document_offsets: torch.Tensor
    vocab_fingerprint: str

    def __post_init__(self) -> None:
        for name, dtype in (
            ("tokens", torch.int32),
            ("sentence_offsets", torch.int64),
            ("document_offsets", torch.int64),
        ):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != 1:
                raise CorpusError(f"PretrainCorpus.{name} must be a 1-D {dtype} tensor")
        if len(self.sentence_offsets) < 1 or len(self.document_offsets) < 1:
            raise CorpusError("PretrainCorpus offsets must hold at least the final end")
        if int(self.sentence_offsets[-1]) != len(self.tokens):
            raise CorpusError(
                f"PretrainCorpus: sentence offsets end at {int(self.sentence_offsets[-1])} "
                f"but there are {len(self.tokens)} tokens"
            )
        if int(self.document_offsets[-1]) != len(self.sentence_offsets) - 1:
            raise CorpusError(
                f"PretrainCorpus: document offsets end at {int(self.document_offsets[-1])} "
                f"but there are {len(self.sentence_offsets) - 1} sentences"
            )

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return len(self.document_offsets) - 1

    @property
    def num_sentences(self) -> int:
        """Number of (non-empty) sentences."""
        return len(self.sentence_offsets) - 1

    @property
    def num_tokens(self) -> int:
        """Number of word-piece tokens."""
        return len(self.tokens)


class _BatchEncoder(Protocol):
    """What load_pretrain_corpus needs of a tokenizer (a ``tokenizers.Tokenizer``)."""

    def encode_batch(self, inputs: list[str], add_special_tokens: bool = True) -> list[Any]: ...


def _corpus_cache_key(files: list[Path], fingerprint: str, max_documents: int | None) -> str:
    """SHA-256 of the resolved files with sizes and mtimes, the vocabulary, the document limit and the
    format version."""
    entries = []
    for path in sorted(files, key=lambda p: str(p.resolve())):
        stat = path.stat()
        entries.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"v": _CORPUS_CACHE_VERSION, "files": entries, "vocab": fingerprint,
                       "max_documents": max_documents}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class _CorpusBuilder:
    """Accumulates tokenized sentences chunk by chunk into the compact arrays."""

    def __init__(self, tokenizer: _BatchEncoder, chunk_sentences: int) -> None:
        self.tokenizer = tokenizer
        self.chunk_sentences = chunk_sentences
        self.pending: list[str] = []
        self.pending_doc_sizes: list[int] = []
        self.tokens: list[np.ndarray] = []
        self.sentence_lengths: list[np.ndarray] = []
        self.doc_sizes: list[np.ndarray] = []

    def add_document(self, sentences: list[str]) -> None:
        """Queue one document's sentences, tokenizing once a chunk is full."""
        if not sentences:
            return
        self.pending.extend(sentences)
        self.pending_doc_sizes.append(len(sentences))
        if len(self.pending) >= self.chunk_sentences:
            self.flush()

    def flush(self) -> None:
        """Tokenize the queued sentences; empty sentences and documents are dropped."""
        if not self.pending:
            return
        # encode_batch_fast (no offsets) is ~2x faster where the tokenizers version has it.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode(self.pending, add_special_tokens=False)
        lengths = np.fromiter((len(encoding.ids) for encoding in encodings), dtype=np.int64, count=len(encodings))
        ids = np.fromiter(
            itertools.chain.from_iterable(encoding.ids for encoding in encodings),
            dtype=np.int32,
            count=int(lengths.sum()),
        )
        doc_starts = np.concatenate([[0], np.cumsum(self.pending_doc_sizes)[:-1]])
        kept_per_doc = np.add.reduceat((lengths > 0).astype(np.int64), doc_starts)
        self.tokens.append(ids)
        self.sentence_lengths.append(lengths[lengths > 0])
        self.doc_sizes.append(kept_per_doc[kept_per_doc > 0])
        self.pending, self.pending_doc_sizes = [], []

    def finish(self, fingerprint: str) -> PretrainCorpus:
        """The :class:`PretrainCorpus` of everything added."""
        self.flush()

        def offsets(parts: list[np.ndarray]) -> torch.Tensor:
            sizes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            return torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

        tokens = np.concatenate(self.tokens) if self.tokens else np.zeros(0, dtype=np.int32)
        return PretrainCorpus(
            tokens=torch.from_numpy(tokens.astype(np.int32)),
            sentence_offsets=offsets(self.sentence_lengths),
            document_offsets=offsets(self.doc_sizes),
            vocab_fingerprint=fingerprint,
        )


def _load_corpus_cache(path: Path, key: str) -> PretrainCorpus | None:
    """The cached corpus if ``path`` holds a valid cache for ``key``, else None (warning if damaged)."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(cached, dict) or cached.get("key") != key:
            return None
        return PretrainCorpus(
            tokens=cached["tokens"],
            sentence_offsets=cached["sentence_offsets"],
            document_offsets=cached["document_offsets"],
            vocab_fingerprint=cached["vocab_fingerprint"],
        )
    except Exception as exc:  # a damaged cache is rebuilt, not fatal
        warnings.warn(f"ignoring unreadable corpus cache {path} ({exc}); rebuilding it", stacklevel=3)
        return None


def _save_corpus_cache(corpus: PretrainCorpus, path: Path, key: str) -> None:
    """torch.save the corpus to a temporary file next to ``path``, then rename it into place."""
    payload = {
        "key": key,
        "version": _CORPUS_CACHE_VERSION,
        "tokens": corpus.tokens,
        "sentence_offsets": corpus.sentence_offsets,
        "document_offsets": corpus.document_offsets,
        "vocab_fingerprint": corpus.vocab_fingerprint,
    }
    save_atomic(payload, path)


def load_pretrain_corpus(
    paths: Sequence[PathLike] | PathLike,
    tokenizer: Any,
    cache_dir: PathLike | None = None,
    chunk_sentences: int = 20000,
    max_documents: int | None = None,
) -> PretrainCorpus:
    """Read, sentence-split and tokenize a corpus, or load it from ``cache_dir``.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (anything with
    ``encode_batch`` and a vocabulary). The result is cached as
    ``cache_dir/corpus-<key>.pt``, the key hashing the resolved files, their
    sizes and mtimes, the tokenizer's vocabulary fingerprint and a format
    version; a later call with the same inputs loads it without tokenizing.
    A damaged cache file is ignored with a warning and rebuilt.
    ``max_documents`` keeps only the first N documents (quick runs).
    """
    files = corpus_files(paths)
    fingerprint = vocab_fingerprint(tokenizer)
    key = _corpus_cache_key(files, fingerprint, max_documents)
    cache_path = Path(cache_dir) / f"corpus-{key}.pt" if cache_dir is not None else None
    if cache_path is not None:
        cached = _load_corpus_cache(cache_path, key)
        if cached is not None:
            return cached
    builder = _CorpusBuilder(tokenizer, chunk_sentences)
    for document in itertools.islice(iter_documents(files), max_documents):
        builder.add_document(split_sentences(document))
    corpus = builder.finish(fingerprint)
    if corpus.num_tokens == 0:
        raise CorpusError(f"the corpus ({', '.join(map(str, files[:5]))}) tokenizes to no tokens at all")
    if cache_path is not None:
        try:
            _save_corpus_cache(corpus, cache_path, key)
        except OSError as exc:
            warnings.warn(f"could not write corpus cache {cache_path} ({exc}); continuing without it", stacklevel=2)
    return corpus


# --------------------------------------------------------------------------
# Sentence-order prediction examples
# --------------------------------------------------------------------------


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

    Each document is walked sentence by sentence; consecutive sentences are
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
    starts = corpus.sentence_offsets.numpy()
    documents = corpus.document_offsets.numpy()
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
