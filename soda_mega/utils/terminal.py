"""Text from a file someone else wrote, made safe to print on a terminal.

Dataset metadata (``soda_meta.json``), checkpoint configs and the messages that quote them are
printed by ``data inspect``, ``eval`` and every error line. A string there may hold ESC
sequences (which recolour, clear or retitle the terminal), carriage returns and newlines (which
forge lines such as ``soda-mega: error: ...``) or bidirectional overrides (which reorder what
is shown). :func:`printable` escapes every character that is not printable, the way ``repr``
does, so what is shown is what the file holds and one value stays on one line.
"""

from __future__ import annotations


def printable(text: object, limit: int | None = None) -> str:
    """``str(text)`` with every non-printable character (controls, ESC, newlines, tabs, format
    characters such as U+202E) written as its ``repr`` escape (``\\x1b``, ``\\n``, ``\\u202e``);
    cut to about ``limit`` characters when given."""
    text = str(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text
