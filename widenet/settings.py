"""Strict settings: the types a settings dataclass declares, enforced; command-line text parsed into them.

Every config dataclass (MoE, encoder, models, training) calls
:func:`check_types` first in ``__post_init__`` and then checks its own ranges,
so each setting is validated in one place and the Python API refuses what the
command line refuses. The rules, read from the field annotations:

- ``bool``: only ``True`` or ``False`` (not ``"false"``, not ``1``);
- ``int``: an ``int`` that is not a ``bool``, within int64 (tensor sizes are);
- ``float``: an ``int`` or ``float`` within float32's range (no NaN, no
  infinity, nothing that becomes infinite in float32 arithmetic);
- ``str``: a ``str``;
- ``X | None``: also ``None``.

Other annotations (nested configs, dicts) are left to the class.
:func:`parse_setting_text` turns a command-line string into the declared type:
booleans from true/false/yes/no/1/0, numbers that must be finite, ``none`` for
an optional setting.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections import Counter
from collections.abc import Hashable, Iterable
from functools import lru_cache
from typing import Any

__all__ = ["FLOAT_LIMIT", "INT_LIMIT", "SettingError", "SettingTypeError", "check_types", "field_kinds",
           "finite_numbers", "parse_bool", "parse_setting_text", "repeated"]

_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")
FLOAT_LIMIT = 3.4e38  # float32's largest finite value, rounded down
INT_LIMIT = 2**63 - 1
_SIMPLE = (bool, int, float, str)


class SettingError(ValueError):
    """A setting has a value its config does not accept."""


class SettingTypeError(SettingError, TypeError):
    """A setting has a value of the wrong type (catchable as ValueError or TypeError)."""


@lru_cache(maxsize=None)
def field_kinds(cls: type) -> dict[str, tuple[type, bool]]:
    """{field: (bool | int | float | str, optional)} for the fields of `cls` with a simple annotation."""
    hints = typing.get_type_hints(cls)
    kinds: dict[str, tuple[type, bool]] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
            else (hint,)
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in _SIMPLE:
            kinds[f.name] = (rest[0], optional)
    return kinds


def _expected(kind: type, optional: bool) -> str:
    words = {bool: "True or False", int: "an integer", float: "a finite number", str: "a string"}[kind]
    return words + (" or None" if optional else "")


def check_types(obj: Any, what: str = "") -> None:
    """Raise SettingTypeError (wrong type) or SettingError (NaN, infinity) for the first field of the
    dataclass `obj` whose value breaks its annotation; `what` prefixes the message ("MoE ")."""
    for name, (kind, optional) in field_kinds(type(obj)).items():
        value = getattr(obj, name)
        if value is None and optional:
            continue
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_range(float(value), FLOAT_LIMIT, f"{what}{name}", "a finite number", repr(value))
            continue
        fits = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not fits:
            raise SettingTypeError(f"{what}{name} must be {_expected(kind, optional)}, got {value!r}")
        if kind is int:
            _check_range(value, INT_LIMIT, f"{what}{name}", "an integer", repr(value))


def _check_range(value: float, limit: float, key: str, kind: str, shown: str) -> None:
    if not math.isfinite(value):
        raise SettingError(f"{key} must be a finite number, got {shown}")
    if not -limit <= value <= limit:
        raise SettingError(f"{key} must be {kind} within +-{limit:.3g}, got {shown}")


def finite_numbers(value: Any) -> bool:
    """Whether value is a non-empty list of finite real numbers (bools are not numbers here)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def repeated(names: Iterable[Hashable]) -> list:
    """The names given more than once (model names, --set keys, columns, labels), sorted, each once."""
    counts = Counter(names)
    return sorted(name for name, count in counts.items() if count > 1)


def parse_bool(text: str, key: str) -> bool:
    """true/yes/1 or false/no/0 (any case); anything else is a SettingError naming `key`."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise SettingError(f"{key} must be true or false (or yes/no, 1/0), got {text!r}")


def parse_setting_text(text: str, kind: type, optional: bool, key: str) -> Any:
    """The value a command-line string stands for, as the setting `key` of type `kind` declares."""
    if optional and text.strip().lower() in ("none", "null"):
        return None
    if kind is bool:
        return parse_bool(text, key)
    if kind is str:
        return text
    try:
        value = int(text) if kind is int else float(text)
    except ValueError:
        raise SettingError(f"{key} must be {_expected(kind, optional)}, got {text!r}") from None
    if kind is int:
        _check_range(value, INT_LIMIT, key, "an integer", repr(text))
    else:
        _check_range(value, FLOAT_LIMIT, key, "a finite number", repr(text))
    return value
