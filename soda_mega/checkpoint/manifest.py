"""Checksums of a checkpoint: ``manifest.json``, written before the publish, checked on load.

``manifest.json`` lists every file of the checkpoint with its size and an xxh3-64 hash of its
bytes (streamed in 8 MiB blocks). The files are hashed by all ranks in parallel, each taking a
share balanced by size, both when the manifest is written and when it is verified; every rank
then knows the same verdict. A verified checkpoint has exactly the bytes it was written with;
a damaged one is named with the first file that differs.

The manifest is read like any other file of a checkpoint from elsewhere: every entry must be a
``{"size": int, "xxh3_64": str}`` object naming a regular file inside the checkpoint folder
(:func:`soda_mega.checkpoint.trust.inside_file`); a manifest that names ``../../dev/zero``, an
absolute path, a symlink leading out, a device or a FIFO is refused before anything is read.

Checkpoints of older soda-mega versions have no manifest: they are checked for completeness
(every file the ``.metadata`` names holds the byte ranges it names) and loaded with a notice.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
import xxhash

from soda_mega.checkpoint.errors import DamagedCheckpoint
from soda_mega.checkpoint.sharded import rank, world
from soda_mega.checkpoint.trust import clip, inside_file
from soda_mega.utils import strict_json

MANIFEST = "manifest.json"
HASH = "xxh3_64"
_BLOCK = 8 << 20
# Files a load opens; one of these in the folder but not in the manifest was not written with it.
_LOADED_SUFFIXES = (".distcp", ".pt", ".json", ".metadata")


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_64()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def checkpoint_files(step_dir: Path) -> list[str]:
    """Paths (relative, sorted) of every file of ``step_dir`` but the manifest."""
    step_dir = Path(step_dir)
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def _share(sizes: dict[str, int]) -> list[str]:
    """This rank's files: largest first to the least-loaded rank (the same on every rank)."""
    n = world()
    loads, mine = [0] * n, []
    for name in sorted(sizes, key=lambda k: (-sizes[k], k)):
        r = loads.index(min(loads))
        loads[r] += sizes[name]
        if r == rank():
            mine.append(name)
    return mine


def _gather(local: list) -> list:
    """Concatenation of every rank's ``local`` list, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(local)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def write_manifest(step_dir: Path, known: dict[str, tuple[int, str]] | None = None) -> dict:
    """Hash the files of ``step_dir`` (all ranks, a share each); rank 0 writes the manifest.

    ``known``: ``{name: (size, hash)}`` of files this rank hashed as it wrote them (an
    asynchronous save's background process; collected from every rank here); a file whose
    size has changed since is hashed again."""
    step_dir = Path(step_dir)
    names = checkpoint_files(step_dir)
    sizes = {n: (step_dir / n).stat().st_size for n in names}
    known = {n: h for n, (size, h) in _gather(sorted((known or {}).items()))
             if sizes.get(n) == size}
    todo = {n: size for n, size in sizes.items() if n not in known}
    hashes = {**known, **dict(_gather([(n, file_hash(step_dir / n)) for n in _share(todo)]))}
    manifest = {"format": 1, "hash": HASH,
                "files": {n: {"size": sizes[n], HASH: hashes[n]} for n in names}}
    if rank() == 0:
        tmp = step_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, step_dir / MANIFEST)
    return manifest


def read_manifest(step_dir: Path) -> dict | None:
    """The checked manifest of ``step_dir`` (None when it has none). Raises
    :class:`DamagedCheckpoint` for a manifest of the wrong shape and
    :class:`~soda_mega.checkpoint.errors.CheckpointError` (refused) for an entry that is not a
    regular file inside the folder."""
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    inside_file(step_dir, MANIFEST)
    try:
        manifest = strict_json.read_file(path)
        files = manifest["files"]
        assert isinstance(files, dict) and manifest.get("hash") == HASH
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        raise DamagedCheckpoint(f"{path}: damaged ({type(err).__name__}: "
                                f"{str(err)[:200]})") from None
    for name, entry in files.items():
        if not (isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
                and isinstance(entry.get(HASH), str)):
            raise DamagedCheckpoint(
                f"{path}: damaged: entry {clip(name)} is {clip(json.dumps(entry)[:200])}, not "
                f'{{"size": bytes, "{HASH}": hex}}')
        inside_file(step_dir, name, f"{MANIFEST} entry")
    return manifest


def _check_file(step_dir: Path, name: str, entry: dict, full: bool) -> str | None:
    path = step_dir / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing"
    if size != entry["size"]:
        return f"{path}: {size:,} bytes, written as {entry['size']:,} (truncated or replaced)"
    if full and file_hash(path) != entry[HASH]:
        return f"{path}: checksum mismatch (the bytes changed since the checkpoint was written)"
    return None


def verify(step_dir: Path, full: bool = True) -> None:
    """Raise :class:`DamagedCheckpoint` naming the files of ``step_dir`` that are missing,
    truncated or changed. ``full=False`` checks presence and sizes only (no reading).
    Collective when torch.distributed is initialised: every rank must call it."""
    step_dir = Path(step_dir)
    problems: list[str] = []
    try:
        manifest = read_manifest(step_dir)
    except DamagedCheckpoint as err:
        manifest, problems = None, [str(err)]
    if manifest is not None:
        files = manifest["files"]
        for name in _share({n: int(e["size"]) for n, e in files.items()}):
            problem = _check_file(step_dir, name, files[name], full)
            if problem:
                problems.append(problem)
        if rank() == 0:
            extra = [n for n in checkpoint_files(step_dir)
                     if n not in files and n.endswith(_LOADED_SUFFIXES)]
            problems += [f"{step_dir / n}: not part of the checkpoint as written" for n in extra]
    elif not problems and rank() == 0:
        print(f"soda-mega: {step_dir} has no {MANIFEST} (written by an older soda-mega): checked "
              f"for completeness only, not checksums", file=sys.stderr, flush=True)
        problems += _legacy_problems(step_dir)
    problems = _gather(problems)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DamagedCheckpoint(f"checkpoint {step_dir} is damaged: {problems[0]}{more}")


def _legacy_problems(step_dir: Path) -> list[str]:
    """Completeness of a checkpoint without manifest: the data files hold what ``.metadata``
    says they hold (no checksums exist to compare the bytes with)."""
    from soda_mega.checkpoint.errors import CheckpointError
    from soda_mega.checkpoint.trust import read_dcp_metadata

    try:
        metadata = read_dcp_metadata(step_dir)
    except CheckpointError as err:
        return [str(err)]
    return data_file_problems(step_dir, metadata)


def data_file_problems(step_dir: Path, metadata) -> list[str]:
    """The data files of ``step_dir`` that are missing or shorter than the entries ``metadata``
    (its ``.metadata``) places in them."""
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, end in sorted(ends.items()):
        path = step_dir / name
        size = path.stat().st_size if path.exists() else None
        if size is None or size < end:
            problems.append(f"{path}: " + ("missing" if size is None else
                                          f"{size:,} bytes, its entries need {end:,} (truncated)"))
    return problems
