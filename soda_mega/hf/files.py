"""Output folders that appear complete or not at all, file sizes, and file hashes.

Both directions (export to a HuggingFace folder, import into a soda-mega checkpoint) write
into a sibling ``OUT.tmp-<pid>`` first and rename it to ``OUT`` only when everything is
written, so an interrupted conversion never leaves a half-written model where a user (or
``from_pretrained``) would take it for a whole one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class HFError(ValueError):
    """A HuggingFace folder or conversion request soda-mega cannot honour; the text says why."""


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5e9 bytes. Decimal units (KB, MB, GB) as in ``transformers``; KiB, MiB and
    GiB are binary; a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise HFError(f"size {text!r}: expected a number with an optional unit "
                      "(B, KB, MB, GB, TB, KiB, MiB, GiB), e.g. 5GB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise HFError(f"size {text!r}: must be at least one byte")
    return value


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_output(out: Path, overwrite: bool = False, overwrite_option: str | None = "--overwrite") -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder unless ``overwrite``.

    ``overwrite_option`` is the command-line flag to suggest (None: the command has none).
    """
    out = Path(out)
    if out.is_file() or out.is_symlink():
        raise HFError(f"output {out}: exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HFError(f"output {out}: folder exists and is not empty; choose a new path"
                      + (f" or pass {overwrite_option}" if overwrite_option else ""))


@contextmanager
def staged_output(out: Path, overwrite: bool = False,
                  overwrite_option: str | None = "--overwrite") -> Iterator[Path]:
    """Yield a fresh ``OUT.tmp-<pid>`` folder; on success it replaces ``out`` in one rename.

    On any error the staging folder is removed and ``out`` is left as it was.
    """
    out = Path(out)
    check_output(out, overwrite, overwrite_option)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        # NOTE: an empty folder (or, with overwrite, a full one) moves aside first so that the
        # final step is a single rename; the old content goes only once the new one is in place.
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def listing(folder: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file under ``folder``, sorted."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size)
                  for p in Path(folder).rglob("*") if p.is_file())


def print_listing(folder: Path, title: str) -> None:
    rows = listing(folder)
    print(title)
    for name, size in rows:
        print(f"  {human_size(size):>10}  {name}")
    print(f"  {human_size(sum(s for _, s in rows)):>10}  total, {len(rows)} files")
