"""BERT-style WordPiece tokenizers built on Hugging Face ``tokenizers``.

Every tokenizer made or loaded here has the five special tokens of
:data:`SPECIAL_TOKENS`; a freshly trained one gives them the ids 0..4 in that
order. Encoding a single text gives ``[CLS] A [SEP]``, a pair gives
``[CLS] A [SEP] B [SEP]`` with token type ids 0 for the first part and 1 for
``B [SEP]``; ``encode(..., add_special_tokens=False)`` gives the bare pieces.

:func:`vocab_fingerprint` summarises the vocabulary (and lowercasing) in a
short hash so a checkpoint can refuse a tokenizer it was not trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ...files import atomic_path, fsync_path
from ...signals import NATIVE_CALL_THREAD, abandon_native_call

__all__ = [
    "SPECIAL_TOKENS",
    "TokenizerError",
    "SpecialIds",
    "train_tokenizer",
    "load_tokenizer",
    "save_tokenizer",
    "special_ids",
    "check_coverage",
    "vocab_fingerprint",
    "pipeline_fingerprint",
    "tokenizer_record",
    "check_same_tokenizer",
]

PathLike = str | os.PathLike

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CONTINUING_PREFIX = "##"
_TOKENIZER_FILE = "tokenizer.json"
_VOCAB_FILE = "vocab.txt"


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, malformed or lacks special tokens."""


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the five special tokens in one tokenizer's vocabulary."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        """The ids in :data:`SPECIAL_TOKENS` order."""
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------


def _post_processor(cls_id: int, sep_id: int) -> processors.TemplateProcessing:
    """``[CLS] $A [SEP]`` for one text, ``[CLS] $A [SEP] $B:1 [SEP]:1`` for a pair."""
    return processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def _bert_pipeline(tok: Tokenizer, lowercase: bool, strip_accents: bool | None = None,
                   chinese_chars: bool = True) -> None:
    """Attach the BERT normalizer, pre-tokenizer and WordPiece decoder to ``tok`` (strip_accents
    None: as lowercase says, as BERT's)."""
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese_chars, strip_accents=strip_accents, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=_CONTINUING_PREFIX)


_T = TypeVar("_T")


def _while_responsive(call: Callable[[], _T]) -> _T:
    """call() in a daemon thread while the main thread waits for it. Python runs its signal
    handlers only between the main thread's bytecodes, so one long native call (the Rust trainer:
    ~13 s on GCIDE, minutes on a large corpus) held Ctrl-C and SIGTERM back until it returned.
    Interrupted, the wait ends at once and the call is abandoned: the command line's process ends;
    in a long-lived one (a notebook) the thread goes on until the trainer returns, then is gone."""
    if threading.current_thread() is not threading.main_thread():
        return call()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # re-raised in the waiting thread
            outcome["error"] = err

    worker = threading.Thread(target=run, name=NATIVE_CALL_THREAD, daemon=True)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    except BaseException:  # a stop signal: the call goes on without a waiter (the process ends unfinalized)
        abandon_native_call()
        raise
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def _wordpiece_trainer(vocab_size: int, min_frequency: int, first_pieces: list[str]) -> trainers.WordPieceTrainer:
    return trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                     special_tokens=list(SPECIAL_TOKENS) + first_pieces,
                                     continuing_subword_prefix=_CONTINUING_PREFIX, show_progress=False)


def _untrained(lowercase: bool) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=_CONTINUING_PREFIX))
    _bert_pipeline(tok, lowercase)
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    lowercase: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a WordPiece tokenizer on ``texts`` (any iterable of strings; read twice, so a one-shot
    iterator is first read into a list: pass something iterable afresh, such as a list or
    ``documents.Documents``, to keep a large corpus out of memory).

    The special tokens get ids 0..4 (``[PAD] [UNK] [CLS] [SEP] [MASK]``). The
    vocabulary may come out smaller than ``vocab_size`` on a small corpus.
    The same texts give the same tokenizer in every process. Hugging Face's
    trainer numbers the one-character continuation pieces (``##e``) in the
    order of a hash map seeded per process, and those numbers break ties
    between equally frequent merges (tokenizers issue #1794), so one corpus
    gave other vocabularies in other processes. A first pass (no merges)
    finds those pieces; the second is given them up front, sorted, as
    special tokens, which are then made ordinary pieces again.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    texts = list(texts) if iter(texts) is texts else texts
    survey = _untrained(lowercase)
    _while_responsive(lambda: survey.train_from_iterator(texts, trainer=_wordpiece_trainer(1, min_frequency, [])))
    pieces = sorted(p for p in survey.get_vocab() if p.startswith(_CONTINUING_PREFIX)
                    and len(p) == len(_CONTINUING_PREFIX) + 1)
    tok = _untrained(lowercase)
    trainer = _wordpiece_trainer(vocab_size, min_frequency, pieces)
    _while_responsive(lambda: tok.train_from_iterator(texts, trainer=trainer))
    tok = _without_added_tokens(tok, set(pieces))
    ids = special_ids(tok, source="the trained tokenizer")
    if ids.as_tuple() != tuple(range(len(SPECIAL_TOKENS))):  # pragma: no cover - a tokenizers change
        raise TokenizerError(f"trained tokenizer has special ids {ids}, expected 0..4")
    tok.post_processor = _post_processor(ids.cls, ids.sep)
    return tok


def _without_added_tokens(tok: Tokenizer, contents: set[str]) -> Tokenizer:
    """tok with the added (special) tokens named in `contents` made ordinary vocabulary pieces."""
    if not contents:
        return tok
    state = json.loads(tok.to_str())
    state["added_tokens"] = [a for a in state["added_tokens"] if a["content"] not in contents]
    return Tokenizer.from_str(json.dumps(state))


# --------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------


def _read_vocab_txt(path: Path) -> dict[str, int]:
    """``{token: line index}`` of a BERT ``vocab.txt`` (one token per line), read as Hugging Face's
    BertTokenizer reads it (``load_vocab``): lines end at \\n, \\r\\n or \\r only (Python's text mode) and
    keep everything else, spaces and other Unicode line separators included, so the ids agree with
    it. Empty lines and repeated tokens are refused."""
    try:
        text = path.read_text(encoding="utf-8")  # text mode: \r\n and \r become \n
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path}: vocabulary file is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read vocabulary file ({exc})") from exc
    vocab: dict[str, int] = {}
    lines = text.split("\n")  # not splitlines(), which also breaks at \x85, \u2028, \x0c, \x1c...
    if lines[-1] == "":  # the newline ending the last line
        lines.pop()
    for index, token in enumerate(lines):
        if not token:
            raise TokenizerError(f"{path}:{index + 1}: empty line in vocabulary (expected one token per line)")
        if token in vocab:
            raise TokenizerError(f"{path}:{index + 1}: token {token!r} already on line {vocab[token] + 1}")
        vocab[token] = index
    if not vocab:
        raise TokenizerError(f"{path}: vocabulary file is empty")
    return vocab


def _tokenizer_from_vocab(path: Path, lowercase: bool, strip_accents: bool | None = None,
                          chinese_chars: bool = True) -> Tokenizer:
    """A BERT WordPiece tokenizer around the vocabulary in ``path``."""
    vocab = _read_vocab_txt(path)
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise TokenizerError(f"{path}: vocabulary lacks the special token(s) {', '.join(missing)}")
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix=_CONTINUING_PREFIX))
    _bert_pipeline(tok, lowercase, strip_accents, chinese_chars)
    tok.post_processor = _post_processor(vocab["[CLS]"], vocab["[SEP]"])
    return tok


def _tokenizer_from_json(path: Path) -> Tokenizer:
    """``Tokenizer.from_file`` with its errors turned into a TokenizerError."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(f"{path}: tokenizer file is not valid UTF-8 text") from None
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({exc})") from exc
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno})") from None
    if not (isinstance(parsed, dict) and isinstance(parsed.get("model"), dict)):
        raise TokenizerError(f"{path}: JSON, but not a Hugging Face tokenizer file (it has no \"model\" object; "
                             "a tokenizer.json has one, beside \"normalizer\", \"pre_tokenizer\", ...)")
    try:
        return Tokenizer.from_str(raw)
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed config
        raise TokenizerError(f"{path}: not a Hugging Face tokenizer file ({exc})") from None


def _resolve_tokenizer_file(path: Path) -> Path:
    """The tokenizer.json or vocab.txt named by ``path`` (a file or a folder)."""
    if path.is_dir():
        for name in (_TOKENIZER_FILE, _VOCAB_FILE):
            if (path / name).is_file():
                return path / name
        raise TokenizerError(f"{path}: folder has neither {_TOKENIZER_FILE} nor {_VOCAB_FILE}")
    if not path.exists():
        raise TokenizerError(
            f"{path}: tokenizer file not found (expected a {_TOKENIZER_FILE}, a {_VOCAB_FILE} or a folder holding one)"
        )
    return path


def load_tokenizer(path: PathLike, lowercase: bool = True, strip_accents: bool | None = None,
                   chinese_chars: bool = True) -> Tokenizer:
    """Load a ``tokenizer.json``, a BERT ``vocab.txt``, or a folder holding one.

    A ``vocab.txt`` is wrapped in the BERT pipeline (normalizer lowercasing
    unless ``lowercase`` is false, and stripping accents as ``strip_accents``
    says, by default when lowercasing; CJK characters split apart unless
    ``chinese_chars`` is false: BertTokenizer's do_lower_case, strip_accents and
    tokenize_chinese_chars; pre-tokenizer, ``[CLS]/[SEP]`` template); a
    ``tokenizer.json`` is used as saved. Either way the five special tokens
    must be in the vocabulary.
    """
    file = _resolve_tokenizer_file(Path(path))
    tok = (_tokenizer_from_json(file) if file.suffix == ".json"
           else _tokenizer_from_vocab(file, lowercase, strip_accents, chinese_chars))
    special_ids(tok, source=str(file))
    return tok


def save_tokenizer(tok: Tokenizer, path: PathLike) -> Path:
    """Write ``tok`` as JSON to ``path`` (or ``path/tokenizer.json`` for a folder), atomically and
    durably (as checkpoints are: a power cut must not leave a run's checkpoints beside an empty
    tokenizer, which could not be trained again alike)."""
    dest = Path(path)
    if dest.is_dir():
        dest = dest / _TOKENIZER_FILE
    with atomic_path(dest) as tmp:
        tmp.write_text(tok.to_str(pretty=True), encoding="utf-8")
        fsync_path(tmp)
    fsync_path(dest.parent)
    return dest


# --------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------


def special_ids(tok: Tokenizer, source: str = "tokenizer") -> SpecialIds:
    """The ids of ``[PAD] [UNK] [CLS] [SEP] [MASK]`` in ``tok``; TokenizerError if any is missing."""
    ids = [tok.token_to_id(token) for token in SPECIAL_TOKENS]
    missing = [token for token, index in zip(SPECIAL_TOKENS, ids) if index is None]
    if missing:
        raise TokenizerError(f"{source}: vocabulary lacks the special token(s) {', '.join(missing)}")
    return SpecialIds(*(int(index) for index in ids))


def _lowercase_flag(tok: Tokenizer) -> bool | None:
    """Whether ``tok``'s normalizer lowercases, or None when it cannot be told."""
    normalizer = getattr(tok, "normalizer", None)
    if normalizer is None:
        return None
    if isinstance(normalizer, normalizers.Lowercase):
        return True
    flag = getattr(normalizer, "lowercase", None)
    if isinstance(flag, bool):
        return flag
    try:  # a Sequence or another normalizer: look in its serialised form
        config = json.loads(tok.to_str()).get("normalizer") or {}
    except Exception:
        return None
    text = json.dumps(config)
    return '"Lowercase"' in text or '"lowercase": true' in text


def vocab_fingerprint(tok: Tokenizer) -> str:
    """SHA-256 over the (token, id) pairs sorted by id and the lowercase flag.

    Stable across :func:`save_tokenizer` / :func:`load_tokenizer`; two
    tokenizers with the same fingerprint give the same ids to the same pieces,
    and with the same pipeline_fingerprint too, the same ids to the same text.
    """
    vocab = tok.get_vocab(with_added_tokens=True)
    pairs = sorted(((index, token) for token, index in vocab.items()))
    digest = hashlib.sha256()
    digest.update(json.dumps({"lowercase": _lowercase_flag(tok)}).encode())
    for index, token in pairs:
        digest.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


# Texts that tell tokenizers apart where their vocabularies agree: accents, case, scripts with and
# without spaces, punctuation, digits, control and zero-width characters, whitespace, a long word.
_PIPELINE_PROBES = (
    "H\u00e9llo WORLD, na\u00efve caf\u00e9 d\u00e9j\u00e0-vu! \u00c4\u00d6\u00dc \u00e4\u00f6\u00fc \u00df "
    "\u00c6\u00d8 \u0153 \u00f1 \u00e7 cafe\u0301",
    "\u4e2d\u6587\u5b57\u7b26 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4 \u03b1\u03b2\u03b3 \u0394\u03a3 "
    "\u043a\u0438\u0440\u0438\u043b\u043b\u0438\u0446\u0430 \u05e2\u05d1\u05e8\u05d9\u05ea "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "tabs\tand\nlines\u00a0and   spaces zero\u200bwidth\u200d joiner\ufeff control\x00\x07 chars",
    "punctuation: ... -- \u2014 (brackets) [x] {y} \"quoted\" 'single' `tick` it's e.g. U.S.A. #tag @user 50%",
    "numbers 1234567890 3.14 1,000 42nd \u00bd \u2162 \ufb01 \uff21\uff22 emoji \U0001f600\U0001f44d\U0001f3fd "
    "\u00a9 \u20ac",
    "UPPER lower MiXeD " + "a" * 120 + " supercalifragilisticexpialidocious",
)


def pipeline_fingerprint(tok: Tokenizer) -> str:
    """SHA-256 over the ids the tokenizer gives a fixed set of texts (_PIPELINE_PROBES, without special
    tokens, as widenet encodes): how it normalises and cuts text, judged by what it does rather than by
    its saved form (which changes between `tokenizers` versions, and holds parts widenet never uses).
    Two vocabularies alike can still give other ids: one strips accents ("\u00e4ppl\u00e9" -> apple), the
    other does not ([UNK])."""
    ids = [encoding.ids for encoding in tok.encode_batch(list(_PIPELINE_PROBES), add_special_tokens=False)]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def tokenizer_record(tok: Tokenizer) -> dict[str, Any]:
    """What a checkpoint or an export records of its tokenizer, for the checks that the same one is
    used again: the vocabulary's fingerprint and size, and the pipeline's fingerprint."""
    return dict(fingerprint=vocab_fingerprint(tok), vocab_size=tok.get_vocab_size(), pipeline=pipeline_fingerprint(tok))


def check_same_tokenizer(tok: Tokenizer, path: PathLike, recorded: dict[str, Any], vocab_size: int | None,
                         model: PathLike) -> None:
    """TokenizerError unless `tok` (read from `path`) is the tokenizer that `model` was trained with, as
    far as its checkpoint or export recorded it (`recorded`: tokenizer_record's fields, each where
    present) and as its embedding (`vocab_size` rows) allows."""
    size = tok.get_vocab_size()
    # A smaller tokenizer is fine (an embedding padded to a round size: Hugging Face folders, runs
    # pretrained with a larger --set vocab_size): its ids all have rows; the fingerprint decides.
    if vocab_size is not None and size > vocab_size:
        raise TokenizerError(f"tokenizer {path} ({size} pieces) does not match the vocabulary the model "
                             f"{model} was trained with ({vocab_size} pieces)")
    if recorded.get("fingerprint") and vocab_fingerprint(tok) != recorded["fingerprint"]:
        raise TokenizerError(f"tokenizer {path} ({size} pieces) is not the one the model {model} was "
                             "trained with (the vocabularies differ)")
    if recorded.get("pipeline") and pipeline_fingerprint(tok) != recorded["pipeline"]:
        raise TokenizerError(f"tokenizer {path} is not the one the model {model} was trained with (the same "
                             "pieces, but it normalises or splits text differently, e.g. accents or case)")


# The share of [UNK] word pieces above which a tokenizer is noted as a poor fit for a text, and
# above which it is refused: a model would learn to predict [UNK] (a BERT vocab.txt on Greek text
# gives ~90%).
UNKNOWN_NOTE, UNKNOWN_LIMIT = 0.05, 0.5


def check_coverage(ids: torch.Tensor, special: SpecialIds, what: str, advice: str) -> None:
    """Refuse (TokenizerError) or note (a warning) token ids of which too many are [UNK], among the
    word pieces (the other special tokens not counted). `what` names the text, `advice` the way out."""
    ids = ids.flatten()
    pieces = int((~torch.isin(ids, torch.tensor([special.pad, special.cls, special.sep, special.mask]))).sum())
    share = int((ids == special.unk).sum()) / max(pieces, 1)
    reason = f"{share:.0%} of {what}'s word pieces are [UNK]"
    if share > UNKNOWN_LIMIT:
        raise TokenizerError(f"{reason}: the tokenizer does not cover this text (another language or script?); "
                             f"{advice}")
    if share > UNKNOWN_NOTE:
        warnings.warn(f"{reason}; the tokenizer does not cover this text well; {advice}", stacklevel=3)
