"""The GNU Collaborative International Dictionary of English (GCIDE) as text.

Debian's ``dict-gcide`` package installs the dictionary as a dictzip file
(:data:`GCIDE_PATH`, readable with :mod:`gzip`). Each entry starts at column 0
with a headword, its pronunciation between backslashes and a part-of-speech
abbreviation, then the definitions on indented lines::

    Arrogant \\Ar"ro*gant\\, a. [F. arrogant, L. arrogans, ...]
       1. Making, or having the disposition to make, exorbitant
          claims of rank or estimation; ...
          [1913 Webster]

:func:`read_gcide` streams the entries as :class:`GcideEntry` records with
the definitions cleaned into plain text and
:func:`gcide_documents` turns them into pretraining documents (gcide_tasks.py
builds labelled part-of-speech and subject-field tasks from them).
"""

from __future__ import annotations

import gzip
import re
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError, PathLike

__all__ = ["FIELD_LABELS", "GCIDE_PATH", "POS_LABELS", "GcideEntry", "GcideError", "clean_definition", "clean_markup", "gcide_documents", "read_gcide"]


GCIDE_PATH = Path("/usr/share/dictd/gcide.dict.dz")
POS_LABELS = ("noun", "verb", "adjective", "adverb")
# The subject fields GCIDE marks on the first sense of at least 400 entries ("(Zool.)"), by label.
FIELD_LABELS = {"Zool.": "zoology", "Bot.": "botany", "Chem.": "chemistry", "Med.": "medicine",
                "Anat.": "anatomy", "Min.": "mineralogy", "Naut.": "nautical", "Mus.": "music",
                "Arch.": "architecture"}


class GcideError(DatasetError):
    """The GCIDE file is missing, not gzip-compressed, or holds no entries."""


@dataclass(frozen=True)
class GcideEntry:
    """One dictionary entry: headword, normalised part of speech, definition text, and the subject
    field of its first sense (a FIELD_LABELS value, e.g. "zoology" for "(Zool.)"; None when unmarked)."""

    headword: str
    pos: str | None
    text: str
    field: str | None = None


# --------------------------------------------------------------------------
# Reading entries
# --------------------------------------------------------------------------

# A column-0 line that opens an entry: a headword, then " \pronunciation".
_ENTRY_START = re.compile(r"([^\s\\][^\\\n]*?) \\")
_PRONUNCIATION = re.compile(r"\\[^\\]*\\")
# Between two variant spellings of one headword ("Pharisaic \..\, Pharisaical \..\").
_VARIANT = re.compile(r"[^\\\[\]{}.]{0,80}?(?=\\)")
_PAREN_PRONUNCIATION = re.compile(r"\s*(\([^()]*\))?[\s,]*")
# The part-of-speech phrase: lowercase abbreviations, possibly joined by "&".
_POS_PHRASE = re.compile(r"(?:[a-z]+\.(?:\s*&\s*|\s+)?)+")
_PHRASE_END = re.compile(r"\s*(?:$|[\[(;,])")
# "n.; pl. Laundries." or "n., pl. {-men}." right after the part of speech.
_INFLECTION = re.compile(r"[;,]\s*(?:[A-Z]\.\s*)?(?:pl\.|sing\.|imp\.|p\. p\.)[^\[\]\n(]*")
# A parenthesised pronunciation: it holds accent codes, stress marks or a hyphen.
_PAREN_WITH_MARKUP = re.compile(r"\([^()\n]*[\[\"`*-][^()\n]*\)")

_POS_NAMES = {
    "n.": "noun",
    "n. pl.": "noun",
    "n. sing.": "noun",
    "n. sing. & pl.": "noun",
    "n. pl. & sing.": "noun",
    "v.": "verb",
    "v. t.": "verb",
    "v. i.": "verb",
    "v. t. & i.": "verb",
    "v. i. & t.": "verb",
    "a.": "adjective",
    "adj.": "adjective",
    "adj. prenom.": "adjective",
    "adj. postnom.": "adjective",
    "adj. predic.": "adjective",
    "adv.": "adverb",
}


def _decode_line(raw: bytes) -> str:
    """UTF-8, falling back to Windows-1252 (GCIDE has a few such bytes)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _iter_raw_lines(handle: gzip.GzipFile, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a binary stream, read in large chunks (much faster than readline)."""
    rest = b""
    while chunk := handle.read(chunk_size):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _starts_entry(line: str) -> bool:
    """Whether a line opens a new entry (or one of the ``00-database-*`` header entries)."""
    if not line or line[0] in " \t":
        return False
    return bool(_ENTRY_START.match(line)) or line.startswith("00-database-")


def _iter_entry_lines(path: Path) -> Iterator[list[str]]:
    """Yield each entry's lines (the first one at column 0), streaming the file."""
    lines: list[str] = []
    try:
        with gzip.open(path, "rb") as handle:
            for raw in _iter_raw_lines(handle):
                line = _decode_line(raw).rstrip("\r")
                if _starts_entry(line):
                    if lines:
                        yield lines
                    lines = [line]
                elif lines:
                    lines.append(line)
    except FileNotFoundError:
        raise GcideError(f"{path}: GCIDE file not found (on Debian/Ubuntu: apt-get install dict-gcide)") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise GcideError(f"{path}: cannot read as a gzip/dictzip file ({exc})") from None
    if lines:
        yield lines


def _parse_header(raw: str, start: int) -> tuple[str | None, int]:
    """Part of speech after the pronunciation(s) at ``raw[start:]`` and where the header ends."""
    index = start
    for _ in range(8):  # a headword has at most a handful of variant spellings
        match = _PRONUNCIATION.match(raw, index)
        if match is None:
            break
        index = _PAREN_PRONUNCIATION.match(raw, match.end()).end()
        if raw.startswith("\\", index):
            continue
        variant = _VARIANT.match(raw, index)
        if variant is None:
            break
        index = variant.end()
    phrase = _POS_PHRASE.match(raw, index)
    if phrase is None:
        return None, index
    pos = _POS_NAMES.get(re.sub(r"\s+", " ", phrase.group(0)).strip())
    if pos is None and not _PHRASE_END.match(raw, phrase.end()):
        return None, index  # "imp. & p. p. of {Drop}" is the definition itself
    return pos, phrase.end()


def _skip_bracketed(raw: str, index: int) -> int:
    """Index after the balanced ``[...]`` group starting at ``index`` (``index`` if unbalanced)."""
    depth = 0
    for pos in range(index, len(raw)):
        if raw[pos] == "[":
            depth += 1
        elif raw[pos] == "]":
            depth -= 1
            if depth == 0:
                return pos + 1
    return index


def _skip_header_tail(raw: str, index: int) -> int:
    """Skip what may follow the part of speech before the definitions.

    That is inflections (``; pl. {Abbeys} (-b[i^]z).``, ``[imp. & p. p.
    {Abandoned}]``), etymologies (``[OF. abandoner ...]``) and stray periods.
    """
    for _ in range(8):
        while index < len(raw) and raw[index].isspace():
            index += 1
        if raw.startswith("[", index):
            end = _skip_bracketed(raw, index)
            if end == index:
                break
            index = end
            continue
        match = _INFLECTION.match(raw, index) or _PAREN_WITH_MARKUP.match(raw, index)
        if match is None and raw.startswith(".", index):
            index += 1
            continue
        if match is None:
            break
        index = match.end()
    return index


def _parse_entry(lines: list[str]) -> GcideEntry | None:
    """A :class:`GcideEntry` from one entry's lines, or None for header/empty entries."""
    if lines[0].startswith("00-database-"):
        return None
    raw = clean_markup("\n".join(lines))
    match = _ENTRY_START.match(raw)
    if match is None:  # pragma: no cover - callers only pass entry starts
        return None
    headword = match.group(1).strip()
    pos, header_end = _parse_header(raw, match.end() - 1)
    body_start = _skip_header_tail(raw, header_end)
    text = clean_definition(raw[body_start:])
    if not headword or not text:
        return None
    label = _FIELD.match(raw, body_start)
    return GcideEntry(headword=headword, pos=pos, text=text, field=FIELD_LABELS.get(label[1]) if label else None)


def read_gcide(path: PathLike = GCIDE_PATH) -> Iterator[GcideEntry]:
    """Stream the entries of a GCIDE ``.dict.dz`` file (the ``00-database-*`` header skipped)."""
    for lines in _iter_entry_lines(Path(path)):
        entry = _parse_entry(lines)
        if entry is not None:
            yield entry


def gcide_documents(path: PathLike = GCIDE_PATH, entries_per_document: int = 8) -> Iterator[str]:
    """Pretraining documents of `entries_per_document` consecutive entries, each ``"Headword: definitions..."``.

    One entry alone is short (median ~30 word pieces), so one-entry documents
    filled only ~38% of 128-token sentence-order examples; eight neighbouring
    (alphabetical, often related) entries fill ~85%.
    """
    group: list[str] = []
    for entry in read_gcide(path):
        group.append(f"{entry.headword}: {entry.text}")
        if len(group) == entries_per_document:
            yield " ".join(group)
            group = []
    if group:
        yield " ".join(group)


# --------------------------------------------------------------------------
# Cleaning the definition text
# --------------------------------------------------------------------------

_SOURCE = (
    r"(?:\d{4}\s+)?Webster(?:\s+\d{4})?(?:\s+Suppl\.)?"
    r"|WordNet(?:\s+\d+\.\d+|\s+sense\s+\d+)?"
    r"|PJC\.?|AS|RDH|RHUD|MW\d*|MI\d*|GG|RP"
    r"|Century\s+Dict\.(?:\s+\d{4})?|Chambers(?:\s+\d{4})?"
)
_SOURCE_MARKER = re.compile(rf"\[\s*(?:{_SOURCE})(?:\s*\+?\s*(?:{_SOURCE}))*\s*\]")
# "1. ", "(a) " and a field label such as "(Zool.)" or "(Civ. Law)" opening a line.
_SENSE_PREFIX = re.compile(r"(?m)^[ \t]*(?:\d{1,2}\.[ \t]+|\([a-z]\)[ \t]+)*(?:\([A-Z][^()]{0,40}\)[ \t]*)?")
# The field label of the first sense, where the definitions begin: "(Zool.)", "1. (Bot.)".
_FIELD = re.compile(r"\s*(?:\d{1,2}\.\s+|\([a-z]\)\s+)*\(([A-Z][a-z]+\.)\)")
# Syllable and stress marks inside a word: Un*fa"vor*a*bly -> Unfavorably.
_STRESS = re.compile(r"(?<=\w)[*\"`](?=\w)")
_ACCENT = re.compile(r"\[([\"'`^=\-.~,*])([A-Za-z]{1,2})\]|\[([A-Za-z]{1,2})\^\]")
_NAMED = re.compile(r"\[([A-Za-z]{2,7})\]")
_COMBINING = {'"': "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", ",": "\u0327", "=": "\u0304"}
_NAMED_CHARS = {
    "ae": "æ",
    "AE": "Æ",
    "oe": "œ",
    "OE": "Œ",
    "eth": "ð",
    "thorn": "þ",
    "yogh": "ȝ",
    "deg": "°",
    "sect": "§",
    "root": "√",
    "sharp": "♯",
    "flat": "♭",
    "ng": "ng",
    "th": "th",
    "imac": "ī",
    "aum": "a",
    "add": "a",
    "asl": "a",
    "udd": "u",
    "alpha": "α",
    "beta": "β",
    "gamma": "γ",
    "delta": "δ",
    "Delta": "Δ",
    "theta": "θ",
    "iota": "ι",
    "pi": "π",
    "rho": "ρ",
    "tau": "τ",
    "phi": "φ",
    "chi": "χ",
    "psi": "ψ",
    "omega": "ω",
    "Omega": "Ω",
    "sigma": "σ",
    "Sigma": "Σ",
    "lambda": "λ",
    "mu": "μ",
}


def _accent(match: re.Match[str]) -> str:
    """``["o]`` -> ö, ``['e]`` -> é, ``[a^]`` -> a, ``[=oo]`` -> oo."""
    if match.group(3) is not None:
        return match.group(3)
    mark, letters = match.group(1), match.group(2)
    combining = _COMBINING.get(mark)
    if combining is None or len(letters) != 1:
        return letters
    return unicodedata.normalize("NFC", letters + combining)


def clean_markup(text: str) -> str:
    """Replace GCIDE's accent and symbol codes and drop the braces of cross references."""
    text = _ACCENT.sub(_accent, text)
    text = _NAMED.sub(lambda m: _NAMED_CHARS.get(m.group(1), m.group(0)), text)
    return text.replace("{", "").replace("}", "")


def clean_definition(text: str) -> str:
    """Definition text without source markers, sense numbers, braces or extra whitespace."""
    text = _SOURCE_MARKER.sub(" ", text)
    text = _SENSE_PREFIX.sub("", text)
    text = clean_markup(text)
    text = _STRESS.sub("", text)
    return " ".join(text.split())
