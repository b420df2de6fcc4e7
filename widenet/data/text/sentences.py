"""Rule-based English sentence splitting: abbreviations, initials and quotes stay inside a sentence."""

from __future__ import annotations

import re

__all__ = ["split_sentences"]


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
