"""Crash-safe MDS output: one work unit at a time, then a merge into the dataset contract.

A build folder (see :mod:`soda_mega.data.schema` for the parts the loader reads)::

    <root>/.build/plan.json                  fingerprint of inputs + settings, unit count, layout
    <root>/.build/units/u000007.json         completion marker of unit 7: per-split stats, lengths
                                             and the unit's MDS shard entries
    <root>/<split>/units/u000007/            MDS shards of unit 7 (MDSWriter output)
    <root>/<split>/index.json                merged index over all units, in unit order
    <root>/<split>/doc_lengths.npy, soda_meta.json

:class:`UnitWriter` writes a unit's documents into ``units/<name>.tmp-<pid>`` folders, renames
them into place when the unit is complete and only then writes the marker (atomically), so a
crash leaves either a finished unit or debris that :func:`clean_partial_units` removes.
For a remote output (:mod:`soda_mega.data.write.target`) ``MDSWriter`` uploads the shards itself and
the marker is uploaded last. :func:`merge_split` writes the top-level ``index.json`` from the
markers alone: each unit's shard entries with ``units/<name>/`` prefixed to their file names,
which is exactly what mosaicml-streaming's ``merge_index`` produces, without reading (or
downloading) a single shard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from soda_mega.data.documents import Document
from soda_mega.data.schema import FORMAT, LENGTHS_FILE, MDS_COLUMNS, META_FILE, SHARD_HASHES, SPLITS
from soda_mega.data.shard_contract import DatasetError, check_index, check_lengths_chunk, check_meta, check_shard
from soda_mega.data.streaming_compat import streaming_module
from soda_mega.data.write.target import BuildTarget
from soda_mega.tokens.layout import VocabLayout

STATE_DIR = ".build"
UNITS_DIR = "units"
MERGED_FILES = ("index.json", LENGTHS_FILE, META_FILE)  # per split, written by the merge


def token_counts(layout: VocabLayout, tokens: np.ndarray) -> dict[str, int]:
    """Tokens per modality: total, text, special, semantic (codebook 0), acoustic (1..K-1)."""
    t = np.asarray(tokens, dtype=np.int64)
    sem_lo, sem_hi = layout.codebook_range(0)
    text = int((t < layout.text_vocab_size).sum())
    special = int(((t >= layout.special_base) & (t < layout.audio_base)).sum())
    semantic = int(((t >= sem_lo) & (t < sem_hi)).sum())
    acoustic = int(((t >= sem_hi) & (t < layout.size)).sum())
    return {"total": int(t.size), "text": text, "special": special, "semantic": semantic,
            "acoustic": acoustic}


@dataclass
class SplitStats:
    """What one split of one unit (or of the whole dataset) holds."""

    num_docs: int = 0
    num_records: int = 0
    doc_types: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    audio_seconds: float = 0.0
    lengths: list[int] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def add(self, layout: VocabLayout, doc: Document) -> None:
        self.num_docs += 1
        self.doc_types[doc.doc_type] += 1
        self.tokens.update(token_counts(layout, doc.tokens))
        self.lengths.append(int(len(doc.tokens)))

    def merge(self, other: SplitStats) -> None:
        self.num_docs += other.num_docs
        self.num_records += other.num_records
        self.doc_types.update(other.doc_types)
        self.tokens.update(other.tokens)
        self.audio_seconds += other.audio_seconds
        self.lengths += other.lengths
        self.skipped += other.skipped

    def to_dict(self) -> dict:
        return {"num_docs": self.num_docs, "num_records": self.num_records,
                "doc_types": dict(sorted(self.doc_types.items())),
                "tokens": {k: int(self.tokens.get(k, 0))
                           for k in ("total", "text", "special", "semantic", "acoustic")},
                "audio_seconds": self.audio_seconds, "lengths": self.lengths, "skipped": self.skipped}

    @classmethod
    def from_dict(cls, d: dict) -> SplitStats:
        return cls(d["num_docs"], d["num_records"], Counter(d["doc_types"]), Counter(d["tokens"]),
                   d["audio_seconds"], list(d["lengths"]), list(d["skipped"]))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def marker_path(root: Path, unit_name: str) -> Path:
    return root / STATE_DIR / UNITS_DIR / f"{unit_name}.json"


def marker_rel(unit_name: str) -> str:
    """A unit marker's path relative to the build root (also its remote key suffix)."""
    return f"{STATE_DIR}/{UNITS_DIR}/{unit_name}.json"


class UnitWriter:
    """MDS writers for one work unit, one per split, committed together."""

    def __init__(self, target: BuildTarget, unit_name: str, layout: VocabLayout, size_limit: int) -> None:
        self.target, self.root, self.name = target, target.root, unit_name
        self.layout, self.size_limit = layout, size_limit
        self.stats = {s: SplitStats() for s in SPLITS}
        self._writers: dict[str, object] = {}

    def _tmp_dir(self, split: str) -> Path:
        return self.root / split / UNITS_DIR / f"{self.name}.tmp-{os.getpid()}"

    def write(self, split: str, doc: Document) -> None:
        writer = self._writers.get(split)
        if writer is None:
            tmp = self._tmp_dir(split)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            out = str(tmp) if self.target.remote is None else \
                (str(tmp), self.target.url(f"{split}/{UNITS_DIR}/{self.name}"))
            writer = streaming_module("format").MDSWriter(
                out=out, columns=MDS_COLUMNS, size_limit=self.size_limit, hashes=list(SHARD_HASHES))
            self._writers[split] = writer
        writer.write({"tokens": doc.tokens.astype(np.int32), "loss_mask": doc.loss_mask.astype(np.uint8),
                      "doc_type": doc.doc_type, "record_id": doc.record_id})
        self.stats[split].add(self.layout, doc)

    def commit(self) -> dict:
        """Close the shards, move them into place (local) or let MDSWriter finish uploading them
        (remote), then write (and publish) the completion marker."""
        shards = {}
        for split, writer in self._writers.items():
            writer.finish()
            shards[split] = writer.shards
            if self.target.remote is None:
                final = self.root / split / UNITS_DIR / self.name
                if final.exists():
                    shutil.rmtree(final)
                os.replace(self._tmp_dir(split), final)
        marker = {"unit": self.name, "splits": {s: st.to_dict() for s, st in self.stats.items()},
                  "shards": {s: shards.get(s, []) for s in SPLITS}}
        path = self.root / marker_rel(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(marker, sort_keys=True))
        self.target.publish(marker_rel(self.name))
        return marker


def check_marker(marker, name: str, root: str | Path) -> dict[str, SplitStats]:
    """The per-split stats of a unit marker, refused (:class:`DatasetError`, naming it) when the
    marker is not what :meth:`UnitWriter.commit` writes."""
    shown = f"{root}/{marker_rel(name)}"
    try:
        if not isinstance(marker, dict) or marker.get("unit") != name:
            raise ValueError(f"not the marker of unit {name}")
        out = {}
        for split in SPLITS:
            stats = SplitStats.from_dict(marker["splits"][split])
            ints = [stats.num_docs, stats.num_records, *stats.lengths, *stats.doc_types.values(),
                    *stats.tokens.values()]
            if any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in ints):
                raise ValueError(f"{split}: counts and lengths must be integers >= 0")
            if stats.num_docs != len(stats.lengths):
                raise ValueError(f"{split}: num_docs {stats.num_docs} but {len(stats.lengths)} lengths")
            if not isinstance(stats.audio_seconds, (int, float)) or not all(
                    isinstance(x, dict) for x in stats.skipped):
                raise ValueError(f"{split}: audio_seconds or skipped of the wrong type")
            out[split] = stats
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DatasetError(f"{shown}: malformed unit marker ({type(err).__name__}: {err}); delete it "
                           "and rerun the part that holds the unit") from None
    return out


def clean_partial_units(root: Path, names: Sequence[str] | None = None) -> list[str]:
    """Remove unit folders of unfinished units (temp folders, or renamed but without marker).

    ``names`` limits the cleaning to those units (a part of a split build must not touch the
    units other parts are writing at the same time)."""
    removed = []
    keep = None if names is None else set(names)
    for split in SPLITS:
        units = root / split / UNITS_DIR
        if not units.is_dir():
            continue
        for d in sorted(units.iterdir()):
            if keep is not None and d.name.split(".tmp")[0] not in keep:
                continue
            if ".tmp" in d.name or not marker_path(root, d.name).is_file():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"{split}/{UNITS_DIR}/{d.name}")
    return removed


def remove_merged_files(root: Path) -> None:
    """Drop the top-level split files, so an unfinished build is never read as a dataset."""
    for split in SPLITS:
        for name in MERGED_FILES:
            (root / split / name).unlink(missing_ok=True)


def merge_split(root: Path, split: str, unit_names: list[str], markers: dict[str, dict],
                meta_base: dict, extra_skipped: Sequence[dict] = (), check_units: bool = True) -> dict:
    """Top-level index.json, doc_lengths.npy and soda_meta.json of one split; returns the meta.

    Everything comes from the unit markers. ``extra_skipped`` are records rejected before any
    unit ran (bad manifest lines). ``check_units`` (a local build) also checks that each marked
    unit's folder is there. Markers may come from other machines (parts of one build): their
    shard entries, the merged index, lengths and meta pass the reader contract
    (:mod:`.shard_contract`) before anything is written, else :class:`DatasetError`.
    """
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    total = SplitStats()
    shards = []
    for name in unit_names:
        shown = f"{split_dir}: unit {name} ({marker_rel(name)})"
        stats = check_marker(markers[name], name, root)[split]
        total.merge(stats)
        if stats.num_docs == 0:
            continue
        unit_dir = split_dir / UNITS_DIR / name
        if check_units and not (unit_dir / "index.json").is_file():
            raise RuntimeError(f"{unit_dir} is missing although unit {name} is marked complete; "
                               "delete its marker in .build/units/ and rerun the build")
        unit_shards = (markers[name].get("shards") or {}).get(split)
        if unit_shards is None:  # a marker written before markers carried the index
            unit_shards = json.loads((unit_dir / "index.json").read_text())["shards"]
        if not isinstance(unit_shards, list):
            raise DatasetError(f"{shown}: shards.{split}: expected a list of shard entries")
        for i, shard in enumerate(unit_shards):
            check_shard(shard, i, shown)
            shard = json.loads(json.dumps(shard))
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["basename"] = f"{UNITS_DIR}/{name}/{shard[key]['basename']}"
            shards.append(shard)
    check_index({"version": 2, "shards": shards}, str(split_dir))
    lengths = np.asarray(total.lengths, dtype=np.int64)
    check_lengths_chunk(lengths, 0, f"{split_dir}/{LENGTHS_FILE}")
    if sum(s["samples"] for s in shards) != len(lengths):
        raise RuntimeError(f"{split_dir}: the unit shards hold {sum(s['samples'] for s in shards)} "
                           f"documents but the markers list {len(lengths)}")
    meta = {"format": FORMAT, "split": split, **meta_base}
    meta.update(num_docs=total.num_docs, num_records=total.num_records,
                doc_types=dict(sorted(total.doc_types.items())),
                tokens=total.to_dict()["tokens"], audio_hours=total.audio_seconds / 3600.0,
                skipped=list(extra_skipped) + total.skipped)
    check_meta(json.loads(json.dumps(meta)), f"{split_dir}/{META_FILE}")
    atomic_write_text(split_dir / "index.json", json.dumps({"version": 2, "shards": shards}, sort_keys=True))
    atomic_save_npy(split_dir / LENGTHS_FILE, lengths)
    atomic_write_text(split_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return meta
