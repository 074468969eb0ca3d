"""Evaluation manifests: JSONL files of items whose audio paths are relative to the manifest.

Unlike training data, where a bad record is skipped and counted, a benchmark with items
silently missing reports a different number: so by default every problem of a manifest is
collected and raised together (:class:`ManifestError`, one line per problem with
``file:line``), and ``skip_bad=True`` turns them into named, counted skips instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from soda_mega.errors import SodaUserError
from soda_mega.utils import strict_json


class ManifestError(SodaUserError, ValueError):
    """The manifest is missing, unreadable, or has items that cannot be evaluated."""

    lists_lines = True  # one bad item a line: the CLI keeps these line breaks (soda_mega.cli)


@dataclass
class Item:
    """One manifest line: its fields, with path fields resolved; ``where`` is ``file:line``."""

    id: str
    fields: dict
    where: str

    def __getitem__(self, key: str):
        return self.fields[key]

    def get(self, key: str, default=None):
        return self.fields.get(key, default)


@dataclass
class Manifest:
    items: list[Item]
    skipped: list[dict] = field(default_factory=list)  # {"item", "where", "reason"}


def read_manifest(path: str | Path, required: Sequence[str], paths: Sequence[str] = (),
                  optional_paths: Sequence[str] = (), skip_bad: bool = False) -> Manifest:
    """Items with every ``required`` field; ``paths`` / ``optional_paths`` name fields holding
    files (relative to the manifest), which must exist."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path}: no such file")
    items, problems = [], []
    seen: dict[str, str] = {}
    # NOTE: read as bytes: a line that is not UTF-8, nested too deeply or holding a
    # 5,000-digit integer is one bad item (strict_json), not an error that ends the command.
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = strict_json.loads(line)
            except strict_json.JSONProblem as err:
                problems.append((where, f"line {number}", str(err)))
                continue
            if not isinstance(obj, dict):
                problems.append((where, f"line {number}", "not a JSON object"))
                continue
            item_id = str(obj.get("id", f"{path.stem}-{number}"))
            missing = [k for k in required if obj.get(k) in (None, "")]
            if missing:
                problems.append((where, item_id, f"missing field(s) {', '.join(missing)}"))
                continue
            bad = None
            for key in (*paths, *optional_paths):
                if obj.get(key) in (None, ""):
                    continue
                resolved = (path.parent / str(obj[key])).resolve()
                if not resolved.is_file():
                    bad = f"{key}: file not found: {resolved}"
                    break
                obj[key] = str(resolved)
            if bad:
                problems.append((where, item_id, bad))
                continue
            if item_id in seen:
                problems.append((where, item_id, f"duplicate id (first at {seen[item_id]})"))
                continue
            seen[item_id] = where
            items.append(Item(item_id, obj, where))
    if problems and not skip_bad:
        lines = [f"  {where} ({item}): {reason}" for where, item, reason in problems[:20]]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ManifestError(f"manifest {path}: {len(problems)} bad item(s):\n" + "\n".join(lines) + more
                            + "\n(fix them, or pass --skip-bad to leave them out and count them)")
    if not items:
        raise ManifestError(f"manifest {path}: no usable items")
    return Manifest(items, [{"item": i, "where": w, "reason": r} for w, i, r in problems])
