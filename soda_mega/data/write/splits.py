"""Which split (train or valid) a record of ``data build`` goes to.

A record goes by a hash of its **group key**, never of its own id: the segments (Lhotse cuts,
manifest lines) of one recording must land in one split, or validation measures recordings the
model trained on (the promise of :mod:`soda_mega.data.schema`). The key is

* ``data.split_by=recording`` (default): the record's recording. A JSONL line names it with
  ``"recording_id"``, else by its audio (codes) path as written; a Lhotse cut by its
  ``recording_id``; a Hugging Face row by ``--recording-column``, else by its record id (one
  row, one recording). An S2ST pair goes with its source recording.
* ``data.split_by=speaker``: coarser, for held-out speakers. Recordings and the speakers heard
  in them are joined into groups (a conversation links its speakers; a speaker links their
  recordings), so that no recording and no speaker appears in both splits; a group's key is its
  smallest speaker name. A record without a speaker goes with its recording's group.

Groups are assigned at planning (:func:`assign_groups`, from the whole plan) and the split is a
pure function of the key (:func:`split_of`), so every part of a multi-machine build and every
worker decides alike, whatever the order. Text documents have no recording: they go by id.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import TypeVar

SPLIT_BY = ("recording", "speaker")
R = TypeVar("R")  # a Recording or an S2STPair


def split_of(key: str, valid_fraction: float) -> str:
    """``valid`` for a stable ``valid_fraction`` share of keys, else ``train``."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return "valid" if h / 2.0**64 < valid_fraction else "train"


def split_key(record) -> str:
    """The key a planned record is split by (its group; its recording or id before planning)."""
    return record.group or record.recording or record.record_id


def record_split(record, valid_fraction: float) -> str:
    """The split of one recording or pair of a plan."""
    return split_of(split_key(record), valid_fraction)


def assign_groups(records: Sequence[R], split_by: str) -> list[R]:
    """The records with their ``group`` set for ``data.split_by`` (see the module docstring)."""
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")
    recording = [r.recording or r.record_id for r in records]
    if split_by == "recording":
        return [dataclasses.replace(r, group=key) for r, key in zip(records, recording)]
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(node):
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for rec_key, rec in zip(recording, records):
        root = find(("r", rec_key))
        for speaker in rec.speakers:
            other = find(("s", speaker))
            if other != root:
                parent[other] = root
    keys: dict[tuple[str, str], str] = {}  # group root -> smallest speaker of the group
    for node in list(parent):
        if node[0] == "s":
            root = find(node)
            keys[root] = min(keys.get(root, node[1]), node[1])
    out = []
    for rec_key, rec in zip(recording, records):
        root = find(("r", rec_key))
        out.append(dataclasses.replace(rec, group=f"speaker:{keys[root]}" if root in keys else rec_key))
    return out
