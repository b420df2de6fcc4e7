"""A tokenized pretraining corpus held compactly and cached on disk.

:func:`load_pretrain_corpus` splits every document into sentences, tokenizes
them into one :class:`PretrainCorpus` (a flat token array with sentence and
document offsets) and caches it, keyed by the files and the tokenizer's
vocabulary.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ...files import file_stamp, load_cache, save_cache
from ...listing import listed
from ...runtime import first_line
from ..errors import PathLike
from .documents import CorpusError, corpus_files, iter_documents
from .sentences import split_sentences
from .tokenizer import check_coverage, pipeline_fingerprint, special_ids, vocab_fingerprint

__all__ = ["PretrainCorpus", "load_pretrain_corpus"]


# Bump when sentence splitting, reading or the cache layout changes.
_CORPUS_CACHE_VERSION = 2
CORPUS_CACHES_KEPT = 8  # a cache folder keeps this many corpus caches, the most recently used
_CACHE_NAME = re.compile(r"corpus-[0-9a-f]{64}\.pt")  # what load_pretrain_corpus writes, nothing else


@dataclass
class PretrainCorpus:
    """A tokenized corpus held compactly.

    ``tokens`` int32 ``(num_tokens,)``: every word-piece id, no special tokens;
    ``sentence_offsets`` int64 ``(num_sentences + 1,)``: sentence ``i`` is
    ``tokens[sentence_offsets[i]:sentence_offsets[i + 1]]``;
    ``document_offsets`` int64 ``(num_documents + 1,)``: document ``d`` is
    sentences ``document_offsets[d]`` to ``document_offsets[d + 1] - 1``;
    ``vocab_fingerprint``: :func:`widenet.data.text.tokenizer.vocab_fingerprint`
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
    """SHA-256 of the resolved files with their stamps (files.file_stamp: size, modification and change
    times), the tokenizer (fingerprint: its vocabulary and its pipeline), the document limit and the
    format version."""
    entries = [[str(path.resolve()), *file_stamp(path)] for path in sorted(files, key=lambda p: str(p.resolve()))]
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
        cached = load_cache(path)
        if not isinstance(cached, dict) or cached.get("key") != key:
            return None
        return PretrainCorpus(
            tokens=cached["tokens"],
            sentence_offsets=cached["sentence_offsets"],
            document_offsets=cached["document_offsets"],
            vocab_fingerprint=cached["vocab_fingerprint"],
        )
    except Exception as exc:  # a damaged cache is rebuilt, not fatal
        warnings.warn(f"ignoring unreadable corpus cache {path} ({first_line(exc)}); rebuilding it", stacklevel=3)
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
    save_cache(payload, path)


def _prune_corpus_caches(folder: Path, kept: Path) -> None:
    """Remove all but the CORPUS_CACHES_KEPT most recently used corpus caches in `folder`, `kept` among
    them (each new tokenizer adds one; a hit marks its file used). Best effort: a file that goes away
    or cannot be removed is left; a process that was about to read a removed one rebuilds it."""
    used = []
    with contextlib.suppress(OSError):  # a folder that cannot be listed is left as it is
        for path in folder.iterdir():
            if _CACHE_NAME.fullmatch(path.name) and path != kept:
                with contextlib.suppress(OSError):
                    used.append((path.stat().st_mtime_ns, path.name, path))
    for *_, path in sorted(used, reverse=True)[CORPUS_CACHES_KEPT - 1:]:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _check_coverage(corpus: PretrainCorpus, tokenizer: Any) -> None:
    check_coverage(corpus.tokens, special_ids(tokenizer), "the corpus",
                   "train one on the corpus (leave --tokenizer out) or choose another")


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
    sizes, modification and change times, the tokenizer's vocabulary and
    pipeline fingerprints and a format version; a later call with the same inputs loads it without tokenizing.
    A damaged cache file is ignored with a warning and rebuilt. Writing one removes all but the
    CORPUS_CACHES_KEPT most recently used (``corpus-<key>.pt`` files only; others in the folder stay).
    ``max_documents`` keeps only the first N documents (quick runs).
    """
    files = corpus_files(paths)
    fingerprint = vocab_fingerprint(tokenizer)
    key = _corpus_cache_key(files, f"{fingerprint} {pipeline_fingerprint(tokenizer)}", max_documents)
    cache_path = Path(cache_dir) / f"corpus-{key}.pt" if cache_dir is not None else None
    if cache_path is not None:
        cached = _load_corpus_cache(cache_path, key)
        if cached is not None:
            with contextlib.suppress(OSError):
                os.utime(cache_path)  # used now: the pruning keeps the most recently used
            _check_coverage(cached, tokenizer)
            return cached
    builder = _CorpusBuilder(tokenizer, chunk_sentences)
    for document in itertools.islice(iter_documents(files), max_documents):
        builder.add_document(split_sentences(document))
    corpus = builder.finish(fingerprint)
    if corpus.num_tokens == 0:
        raise CorpusError(f"the corpus ({listed(files)}) tokenizes to no tokens at all")
    _check_coverage(corpus, tokenizer)
    if cache_path is not None:
        try:
            _save_corpus_cache(corpus, cache_path, key)
        except OSError as exc:
            warnings.warn(f"could not write corpus cache {cache_path} ({exc}); continuing without it", stacklevel=2)
        else:
            _prune_corpus_caches(cache_path.parent, cache_path)
    return corpus
