"""What a ``data build`` worker process is given: :class:`WorkerSpec`.

Kept apart from :mod:`.build_worker` (which imports torch and the codec) so that a spawned
worker unpickles its arguments with nothing heavy imported: it arms its parent-death signal
before it sets up (:func:`soda_mega.utils.lifetime.spawned_dying_with`).
"""

from __future__ import annotations

from dataclasses import dataclass

from soda_mega.config.schema import MAX_RECORD_AUDIO_BYTES

#: the worker initializer, by name (imported in the worker after its parent-death signal)
INIT_WORKER = "soda_mega.data.write.build_worker:init_worker"
#: the initializer of a worker's feeder processes, by name
INIT_FEEDER = "soda_mega.data.write.build_worker:init_feeder"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs (picklable)."""

    root: str  # the local folder written to: OUT itself, or the stage of a remote OUT
    kind: str
    layout: dict
    tokenizer: str | None
    doc_types: tuple[str, ...]
    valid_fraction: float
    shard_size_limit: int
    codec: dict | None = None  # MimiCodec kwargs, None when no record needs encoding
    threads: int = 0  # torch threads per worker (0 = leave torch's default)
    remote: str | None = None  # remote OUT (s3://...), None for a local build
    devices: tuple[str, ...] = ()  # device path: the codec devices, one per worker slot
    feeders: int = 0  # decode/resample processes per worker (device path only)
    max_record_audio_bytes: int = MAX_RECORD_AUDIO_BYTES  # data.max_record_audio_bytes
