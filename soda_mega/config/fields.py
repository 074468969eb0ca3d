"""Field helpers for the typed configuration.

Every configuration field is declared with :func:`fld`, which records a one-line help text
and the constraints that :func:`validate_section` checks at load time. Keeping the
constraints next to the field (rather than in a separate validation function) means the
``--help`` output, the error messages and the checks can never drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from soda_mega.errors import SodaUserError


class ConfigError(SodaUserError, ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


_QUOTE = reprlib.Repr()
_QUOTE.maxstring = 80
_QUOTE.maxother = 80
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxset = _QUOTE.maxdict = 6
_QUOTE.maxlevel = 3


def short(value: Any, limit: int = 120) -> str:
    """How a message quotes a user's value: ``repr`` of ``value`` with long strings, long or
    deep containers abbreviated (``...``), at most about ``limit`` characters however large."""
    try:
        text = _QUOTE.repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        return f"<a {type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[:limit] + "..."


def clip(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (a parser's message that quotes a whole line)."""
    return text if len(text) <= limit else text[:limit] + " [...]"


def _initials(name: str) -> str:
    return "".join(part[0] for part in name.split("_") if part)


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` naming the option ``word`` most likely stands for, else ``""``:
    a close spelling (``hiden_size``), or an abbreviation by initials either way (``tp`` for
    ``tensor_parallel``, ``learning_rate`` for ``lr``)."""
    # NOTE: difflib alone misses abbreviations: "tp" and "tensor_parallel" share too little
    # text for its ratio, yet "tp" is what Megatron's own flags call it.
    word, options = str(word)[:100], [str(o) for o in options]
    by_initials = [o for o in options if "_" in o and _initials(o) == word.replace("_", "")]
    by_initials += [o for o in options if "_" in word and o == _initials(word)]
    close = by_initials[:1] or difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def fld(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: Sequence[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """Declare a config field with its help text and constraints."""
    if not help:
        raise TypeError("every config field needs a one-line help text")
    meta = {"help": help, "choices": tuple(choices) if choices else None,
            "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML or a ``--key=value`` string) to the field type ``tp``."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required (got none)")
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if inner is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            if isinstance(value, str):
                # Accept 2e6-style integers, common for token budgets.
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError
                return int(as_float) if ("e" in value.lower() or "." in value) else int(value)
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{name}: must be a finite number, got {short(value)}")
            return number
        if inner is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
        if origin in (list, tuple):
            (elem,) = typing.get_args(inner)[:1] or (str,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            items = [coerce(f"{name}[{i}]", elem, v) for i, v in enumerate(value)]
            return list(items) if origin is list else tuple(items)
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        type_name = getattr(inner, "__name__", str(inner))
        raise ConfigError(f"{name}: expected {type_name}, got {short(value)}") from None
    return value


def check_constraints(name: str, f: dataclasses.Field, value: Any) -> None:
    """Check the ``choices`` and bounds recorded by :func:`fld` for one field value."""
    meta = f.metadata
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{name}: {short(value)} is not allowed; choose one of {allowed}")
    for key, op, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                          ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
        bound = meta.get(key)
        if bound is not None and not op(value, bound):
            raise ConfigError(f"{name}: must be {word} {bound}, got {short(value)}")


def validate_section(prefix: str, section: Any) -> None:
    """Coerce and check every field of one dataclass section in place."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        name = f"{prefix}.{f.name}"
        value = coerce(name, hints[f.name], getattr(section, f.name))
        check_constraints(name, f, value)
        setattr(section, f.name, value)


def field_help(section_cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field of a section, for ``--help`` listings."""
    hints = typing.get_type_hints(section_cls)
    rows = []
    for f in dataclasses.fields(section_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            text += f" [one of: {', '.join(map(str, f.metadata['choices']))}]"
        tp = hints[f.name]
        rows.append((f.name, getattr(tp, "__name__", str(tp).replace("typing.", "")), default, text))
    return rows
