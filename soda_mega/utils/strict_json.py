"""JSON from a file soda-mega did not write: every way it can be wrong is one :class:`JSONProblem`.

``json.loads`` fails on a stranger's file in more ways than ``JSONDecodeError``: bytes that are
not UTF-8 (``UnicodeDecodeError``), arrays nested some thousand levels deep (``RecursionError``,
not even an ``Exception`` subclass a caller expects), an integer of more than 4,300 digits
(a plain ``ValueError`` from Python's int-conversion limit). :func:`loads` turns each into a
:class:`JSONProblem` whose text is one short line; each reader adds the file name and raises its
own error type (so the command exits 2 naming the file). Standard library only: every layer
may use it.
"""

from __future__ import annotations

import json
import sys
from typing import Any


class JSONProblem(ValueError):
    """Why a text is not JSON that can be read (one short line, without the file name)."""


def loads(data: str | bytes) -> Any:
    """``json.loads(data)``, raising :class:`JSONProblem` for anything that is not readable JSON."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as err:
            raise JSONProblem(f"not valid UTF-8 (byte 0x{data[err.start]:02x} at offset "
                              f"{err.start})") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise JSONProblem(f"not valid JSON ({err.msg} at line {err.lineno} column "
                          f"{err.colno})") from None
    except RecursionError:
        raise JSONProblem("not readable JSON: nested too deeply") from None
    except ValueError as err:
        if "digits" in str(err):
            raise JSONProblem(f"not readable JSON: holds an integer of more than "
                              f"{sys.get_int_max_str_digits()} digits") from None
        raise JSONProblem(f"not valid JSON ({str(err)[:200]})") from None


def read_file(path) -> Any:
    """:func:`loads` of the bytes of ``path`` (``OSError`` passes through: the caller names it)."""
    with open(path, "rb") as f:
        return loads(f.read())
