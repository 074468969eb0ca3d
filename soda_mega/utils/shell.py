"""Values written into the shell scripts and command lines soda-mega generates.

``scaling sweep --launcher slurm`` writes ``sweep.sbatch`` from a manifest that may come from
elsewhere, and ``scaling sweep --dry-run`` prints torchrun command lines meant to be pasted into
a shell. Two rules keep a value from ever becoming code there:

* a value that is a shell word is written through :func:`shlex.quote` (:func:`command_line`),
  so bash reads it back as exactly one argument, whatever it holds;
* a value that cannot be quoted where it goes (a comment line, an ``#SBATCH`` line, which
  sbatch parses with its own rules, a path component) must be a *plain name*
  (:func:`plain_name`) or a path fit for an ``#SBATCH`` line (:func:`sbatch_path`); anything
  else is refused with :class:`UnsafeValueError` naming the field (exit 2).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from soda_mega.errors import SodaUserError

#: Letters, digits and ``._+-``, starting with a letter, digit or ``_``; at most 128 characters.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")

# Characters an #SBATCH line carries as they are: sbatch splits its directives at white space,
# treats double quotes specially and expands % patterns in file names (%j, %x, ...).
_SBATCH_PATH = re.compile(r"[A-Za-z0-9._+,/=@:~-]+")

# SLURM --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED / INFINITE.
_SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE|unlimited|infinite")


class UnsafeValueError(SodaUserError, ValueError):
    """A value that would not stay one plain word in a generated script or command line."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def plain_name(value: object, field: str) -> str:
    """``value`` when it is a plain name (:data:`PLAIN_NAME`: never empty, ``.`` or ``..``), else
    :class:`UnsafeValueError` naming ``field``."""
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value):
        raise UnsafeValueError(f"{field}: {_shown(value)} is not a plain name (letters, digits and "
                               "._+- only, at most 128 characters, not starting with . + or -)")
    return value


def relative_plain_path(value: object, field: str) -> str:
    """``value`` when it is a relative path whose every component is a plain name (so it stays
    inside the folder it is joined to), else :class:`UnsafeValueError` naming ``field``."""
    if not isinstance(value, str) or not value:
        raise UnsafeValueError(f"{field}: {_shown(value)} is not a relative path")
    path = PurePosixPath(value)
    if path.is_absolute():
        raise UnsafeValueError(f"{field}: {_shown(value)} is absolute; it must be a path relative to "
                               "its folder, made of plain names")
    for part in path.parts:
        plain_name(part, f"{field} (component {part!r})")
    return value


def sbatch_path(path: str | Path, field: str) -> str:
    """``path`` as text when an ``#SBATCH`` line can carry it unchanged, else
    :class:`UnsafeValueError` naming ``field`` and saying what to do."""
    text = str(path)
    if not _SBATCH_PATH.fullmatch(text):
        raise UnsafeValueError(f"{field}: {_shown(text)} cannot be written into an #SBATCH line (it holds "
                               "white space, quotes, %, # or other characters sbatch reads itself); "
                               "use a folder whose path has letters, digits and ._+,/=@:~- only")
    return text


def slurm_time(value: str, field: str = "--time") -> str:
    """A SLURM time limit (``90``, ``12:00:00``, ``2-00:00:00``, ...), else
    :class:`UnsafeValueError` naming ``field``."""
    if not isinstance(value, str) or not _SLURM_TIME.fullmatch(value):
        raise UnsafeValueError(f"{field}: {_shown(value)} is not a SLURM time limit (MINUTES, HH:MM:SS, "
                               "D-HH:MM:SS, ...)")
    return value


def command_line(argv: Iterable[object]) -> str:
    """``argv`` as one shell line: bash splits it back into exactly these arguments."""
    return shlex.join(str(a) for a in argv)
