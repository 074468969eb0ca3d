"""Files that come from elsewhere are opened only when they are regular files.

A dataset, checkpoint or run folder is data from elsewhere, and a name in it may stand for a
FIFO (``open()`` blocks until someone writes, forever), a device (``/dev/zero`` never ends),
a socket or a folder. Every reader of such a folder asks :func:`not_regular` before it opens a
file (the checkpoint reader, the dataset reader contract, the ``latest`` pointer), so one rule
and one wording hold everywhere. Standard library only: every layer may use it.

NOTE: a file swapped between this check and its open is not covered (see the README's trust
section); the check is what keeps a planted FIFO or device from being opened at all.
"""

from __future__ import annotations

import os
import stat


def kind_of(mode: int) -> str | None:
    """What a file of this ``st_mode`` is when it is not a regular file ("a FIFO", ...), else None."""
    if stat.S_ISREG(mode):
        return None
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")


def not_regular(path: str | os.PathLike) -> str | None:
    """Why ``path`` (symlinks followed) must not be opened: "is a FIFO, not a regular file", ...;
    None when it is a regular file or does not exist (the reader reports a missing file)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    kind = kind_of(mode)
    return f"is {kind}, not a regular file" if kind else None
