"""Read the records of an offline W&B run file (``run-<id>.wandb``) for the tests.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0) and
then LevelDB-log-style 32 KiB blocks of chunks, each ``crc32c (4) | length (2, LE) | type
(1: full, 2: first, 3: middle, 4: last)`` followed by its bytes; a record is one protobuf
``wandb_internal_pb2.Record``. Newer wandb versions no longer ship a Python reader for it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def _chunks(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file")
    pos = HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            pos += left  # zero padding to the end of the block
            continue
        yield kind, data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length


def records(path: Path):
    """The protobuf records of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    pending = b""
    for kind, chunk in _chunks(Path(path).read_bytes()):
        if kind == 1:
            payload = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        else:
            payload, pending = pending + chunk, b""
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def history(path: Path) -> list[dict]:
    """The logged rows of one run file: ``[{key: value, ...}, ...]``."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


def run_ids(path: Path) -> list[str]:
    return [rec.run.run_id for rec in records(path) if rec.WhichOneof("record_type") == "run"]
