"""Labelled classification tasks (train/validation TSV files) built from GCIDE entries.

Each row is a sentence with the entry's headword hidden as ``_``:
    pos     the first sentence of the definitions; label: the part of speech
            (noun, verb, adjective, adverb). Often given away by the first
            word ("To ..." for verbs).
    field   the same sentence; label: the subject field of the first sense
            (zoology, botany, chemistry, ... from the "(Zool.)" marks, which
            the text never contains): read from what the definition talks
            about, mostly its rare content words.
    usage   the first example of the headword in use ("as, the _ of a
            child"); label: the part of speech, read from the words around
            the gap alone (a syntactic task: what masked-LM pretraining
            practises).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable

from ...files import atomic_path, no_folder_at, refuse_non_folder
from ..errors import PathLike
from .gcide import FIELD_LABELS, POS_LABELS, GcideEntry, GcideError, read_gcide
from .sentences import split_sentences

__all__ = ["TASK_KINDS", "write_gcide_task"]


# A quotation's source: "--Shak." (a dash used as punctuation is spaced: "; -- used").
_ATTRIBUTION = re.compile(r"\s*--(?=[A-Z])")
# A run-on derived form with its own part of speech: "-- Unfavorably, adv." or "-- n."
_RUN_ON = re.compile(r"\s--\s+(?:[^\s,]+(?:\s[^\s,]+)?,+\s+)?[a-z]{1,4}\.(?=\s|$)")
_UNINFORMATIVE = re.compile(r"^(?:see|same as|alt\. of|pl\. of|imp\. of|p\. p\.)\b", re.IGNORECASE)


# A usage example: "as, the _ of a child" up to the next ";" or the sentence's end.
_USAGE = re.compile(r"(?<!\w)as, (.+?)(?=;|\.\s|\.?$)", re.MULTILINE)


def _headword(entry: GcideEntry) -> re.Pattern[str]:
    """The entry's headword as a whole word, any case."""
    return re.compile(rf"(?<!\w){re.escape(entry.headword)}(?!\w)", re.IGNORECASE)


def _first_sentence(entry: GcideEntry) -> str | None:
    """The entry's first definition sentence, headword masked as "_"; None when it says too little."""
    sentences = split_sentences(entry.text)
    if not sentences:
        return None
    sentence = _headword(entry).sub("_", sentences[0])
    sentence = _RUN_ON.split(_ATTRIBUTION.split(sentence, maxsplit=1)[0], maxsplit=1)[0]
    sentence = " ".join(sentence.replace("\t", " ").split())
    if len(sentence.split()) < 3 or _UNINFORMATIVE.match(sentence) or sentence.startswith("Syn:"):
        return None
    if sentence[0] in ",;.-()" or "\\" in sentence:  # left-overs of a header the parser did not follow
        return None
    return sentence


def _usage_example(entry: GcideEntry) -> str | None:
    """The first "as, ..." example in the entry's definitions that uses the headword, the headword
    masked as "_" (its quotation's source dropped); None when there is none of 3 words or more."""
    headword = _headword(entry)
    for match in _USAGE.finditer(entry.text):
        example, uses = headword.subn("_", _ATTRIBUTION.split(match[1], maxsplit=1)[0])
        example = " ".join(example.split()).strip('"')
        if uses and len(example.split()) >= 3 and "\\" not in example:
            return example
    return None


# kind -> (the labels, the entry attribute that holds an entry's label, the row's sentence)
TASK_KINDS: dict[str, tuple[tuple[str, ...], str, Callable[[GcideEntry], str | None]]] = {
    "pos": (POS_LABELS, "pos", _first_sentence),
    "field": (tuple(FIELD_LABELS.values()), "field", _first_sentence),
    "usage": (POS_LABELS, "pos", _usage_example),
}


def _collect_examples(path: PathLike, kind: str) -> dict[str, dict[str, list[str]]]:
    """``{label: {headword (lowercased): [sentence, ...]}}`` over the whole dictionary, each sentence
    once: with the headword hidden, different entries often read alike ("to _ the arm", "a good _"),
    and such a sentence in both splits (or twice in one) would be a test example trained on."""
    labels, attribute, text_of = TASK_KINDS[kind]
    found: dict[str, dict[str, list[str]]] = {label: defaultdict(list) for label in labels}
    seen: set[str] = set()
    for entry in read_gcide(path):
        label = getattr(entry, attribute)
        sentence = text_of(entry) if label in found else None
        key = " ".join(sentence.split()).lower() if sentence is not None else None
        if key is not None and key not in seen:
            seen.add(key)
            found[label][entry.headword.lower()].append(sentence)
    return found


def _balanced_quotas(available: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over the labels as evenly as their ``available`` counts allow.

    Water filling: a label with fewer examples than its even share gives all
    of them and the rest is shared among the others.
    """
    quotas = {label: 0 for label in available}
    remaining = total
    open_labels = [label for label in sorted(available, key=available.__getitem__) if available[label] > 0]
    while open_labels and remaining > 0:
        share = max(remaining // len(open_labels), 1)
        for label in list(open_labels):
            take = min(share, available[label] - quotas[label], remaining)
            quotas[label] += take
            remaining -= take
            if quotas[label] == available[label]:
                open_labels.remove(label)
            if remaining == 0:
                break
    return quotas


def _apportion(quotas: dict[str, int], part: int) -> dict[str, int]:
    """``part`` of ``sum(quotas)`` spread over the labels in proportion to their quotas (largest
    remainders), summing to exactly ``part``, no label above its quota."""
    total = sum(quotas.values())
    shares = {label: q * part // total for label, q in quotas.items()}
    remainder = {label: q * part % total for label, q in quotas.items()}
    for label in sorted(quotas, key=lambda label: (-remainder[label], label))[:part - sum(shares.values())]:
        shares[label] += 1
    return shares


def _assign_splits(
    found: dict[str, dict[str, list[str]]], train_size: int, validation_size: int, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Class-balanced train/validation rows with no headword in both splits.

    The validation set gets exactly ``validation_size`` rows. The training set gets ``train_size``
    rows unless headwords with several labels (an "Arrow" noun and verb), taken for validation,
    leave too few; then it gets fewer and the caller refuses. Needs ``train_size +
    validation_size`` examples in all.
    """
    available = {label: len(words) for label, words in found.items()}
    quotas = _balanced_quotas(available, train_size + validation_size)
    val_left = _apportion(quotas, validation_size)
    train_left = {label: quotas[label] - val_left[label] for label in quotas}
    headwords = sorted({word for words in found.values() for word in words})
    random.Random(seed).shuffle(headwords)
    labels_of = {word: [label for label in found if word in found[label]] for word in headwords}
    validation: list[tuple[str, str]] = []
    in_validation: set[str] = set()
    # headwords with one label first: a validation headword's other labels are lost to training
    for word in sorted(headwords, key=lambda word: len(labels_of[word]) > 1):
        wanted = [label for label in labels_of[word] if val_left[label] > 0]
        if wanted:
            in_validation.add(word)
            for label in wanted:
                validation.append((found[label][word][0], label))
                val_left[label] -= 1
    train: list[tuple[str, str]] = []
    spare: dict[str, list[tuple[str, str]]] = {label: [] for label in found}
    for word in headwords:
        if word in in_validation:
            continue
        for label in labels_of[word]:
            row = (found[label][word][0], label)
            if train_left[label] > 0:
                train.append(row)
                train_left[label] -= 1
            else:
                spare[label].append(row)
    if short := sum(train_left.values()):  # labels that lost headwords to validation: fill from the others
        extra = _balanced_quotas({label: len(rows) for label, rows in spare.items()}, short)
        for label, count in extra.items():
            train.extend(spare[label][:count])
    return train, validation


def _write_rows(rows: list[tuple[str, str]], path: Path) -> None:
    """Write ``sentence<TAB>label`` rows with a header."""
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("sentence\tlabel\n")
        for sentence, label in rows:
            clean = " ".join(sentence.replace("\t", " ").split())
            handle.write(f"{clean}\t{label}\n")


def write_gcide_task(
    path: PathLike,
    out_dir: PathLike,
    kind: str = "pos",
    train_size: int = 4000,
    validation_size: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write ``train.tsv`` and ``validation.tsv`` of the task ``kind`` (a TASK_KINDS name).

    Each row is the first sentence of an entry's definitions with the headword
    replaced by ``_`` and the entry's label. The labels are balanced as far as
    the dictionary allows, a headword appears in only one split, a sentence
    (headword hidden) in only one row, and the files
    are written atomically. The files hold exactly ``train_size`` and
    ``validation_size`` rows; a request the dictionary cannot meet raises
    GcideError, and existing files raise ValueError unless ``overwrite``.
    """
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown GCIDE task {kind!r}; choose one of {', '.join(TASK_KINDS)}")
    if train_size < 1 or validation_size < 1:
        raise ValueError(f"train_size and validation_size must be positive, got {train_size}, {validation_size}")
    out = Path(out_dir)
    way_out = "choose a folder for train.tsv and validation.tsv"
    if out.exists() and not out.is_dir():
        raise ValueError(no_folder_at(out, "--out", way_out))
    refuse_non_folder(out, "--out", way_out)  # a file above it (NotADirectoryError, as writing there would raise)
    train_path, validation_path = out / "train.tsv", out / "validation.tsv"
    _refuse_existing(train_path, validation_path, overwrite)
    found = _collect_examples(path, kind)
    if not any(found.values()):
        raise GcideError(f"{path}: no entry with a {'/'.join(found)} label and a usable definition")
    available = sum(len(words) for words in found.values())
    if available < train_size + validation_size:
        raise GcideError(f"{path}: the {kind} task has {available} examples, fewer than the {train_size} training + "
                         f"{validation_size} validation asked for; ask for at most {available} in all")
    train, validation = _assign_splits(found, train_size, validation_size, seed)
    if len(train) < train_size:
        raise GcideError(f"{path}: the {kind} task has {available} examples, but with each headword in one set "
                         f"only and the labels balanced, just {len(train)} training examples fit beside "
                         f"{validation_size} validation ones; ask for fewer")
    rng = random.Random(seed + 1)
    rng.shuffle(train)
    rng.shuffle(validation)
    _refuse_existing(train_path, validation_path, overwrite)  # again: reading the dictionary takes a while
    with atomic_path(train_path) as train_tmp, atomic_path(validation_path) as validation_tmp:
        _write_rows(train, train_tmp)
        _write_rows(validation, validation_tmp)
    return train_path, validation_path


def _refuse_existing(train_path: Path, validation_path: Path, overwrite: bool) -> None:
    if overwrite:
        return
    for path in (train_path, validation_path):
        if path.exists():
            raise ValueError(f"{path} already exists; give --overwrite to replace it")
