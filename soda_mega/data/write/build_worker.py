"""The worker side of ``data build``: one work unit -> documents -> MDS shards and a marker.

A worker is a spawned process (or the building process itself for 0 workers) set up by
:func:`init_worker` from a picklable :class:`WorkerSpec`. It reads each unit's recordings,
encodes them with Mimi (or takes ``.npy`` codes), tokenizes, builds documents and writes them
with :class:`~soda_mega.data.write.writer.UnitWriter`. On the device path (:mod:`.devices`) the
worker takes a device slot when it starts, holds the only codec on that device, and a pool of
feeder processes decodes and resamples the unit's audio ahead of the codec.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Sequence

import numpy as np

from soda_mega.data.codec import MIMI_FRAME_RATE, MIMI_SAMPLE_RATE, shared_mimi, to_mono
from soda_mega.data.documents import recording_documents, s2st_document, segment_frames, text_document
from soda_mega.data.tokenizer import load_tokenizer
from soda_mega.data.write.devices import device_for_slot
from soda_mega.data.write.inputs import (
    SLICE_END_TOLERANCE_S,
    InputError,
    Recording,
    S2STPair,
    Skipped,
    TextRange,
    load_audio,
    load_codes,
    read_text_range,
    set_max_record_audio_bytes,
)
from soda_mega.data.write.splits import record_split, split_of
from soda_mega.data.write.target import BuildTarget
from soda_mega.data.write.worker_spec import INIT_FEEDER, WorkerSpec
from soda_mega.data.write.writer import UnitWriter
from soda_mega.tokens.layout import VocabLayout
from soda_mega.utils.lifetime import spawned_dying_with

_STATE: dict = {}


def _take_slot(slots) -> int:
    if slots is None:
        return 0
    with slots.get_lock():
        slot = slots.value
        slots.value += 1
    return slot


def init_worker(spec: WorkerSpec, progress_queue=None, slots=None) -> None:
    """Set up this process for :func:`run_unit`; ``slots`` (a shared counter) hands out devices.
    A spawned worker runs it through :func:`~soda_mega.utils.lifetime.spawned_dying_with`, so it
    dies with the build that spawned it."""
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    layout = VocabLayout.from_dict(spec.layout)
    set_max_record_audio_bytes(spec.max_record_audio_bytes)
    device = device_for_slot(spec.devices, _take_slot(slots)) if spec.devices else None
    if device and device.startswith("cuda:"):
        torch.cuda.set_device(device)  # anything made on "cuda" without an index lands here too
    codec = None
    if spec.codec:
        codec = shared_mimi(**(dict(spec.codec, device=device) if device else spec.codec))
    feeders = None
    if spec.feeders and codec is not None:
        # NOTE: a multiprocessing Pool, not a ProcessPoolExecutor: its processes are daemonic, so
        # they end with this worker however it ends (a nested executor hung the worker's exit).
        feeders = mp.get_context("spawn").Pool(spec.feeders, initializer=spawned_dying_with,
                                               initargs=(os.getpid(), INIT_FEEDER,
                                                         spec.max_record_audio_bytes))
    target = BuildTarget(spec.remote, staging=spec.root) if spec.remote else BuildTarget(spec.root)
    shutdown_worker()
    _STATE.update(spec=spec, layout=layout, queue=progress_queue, target=target, codec=codec,
                  tokenizer=load_tokenizer(spec.tokenizer, layout, announce=False),
                  device=(device or str(codec.device)) if codec is not None else None, feeders=feeders,
                  prefetch={})
    if progress_queue is not None:
        progress_queue.put(("worker", os.getpid(), _STATE["device"]))


def shutdown_worker() -> None:
    """Stop this process's feeders and forget its state."""
    feeders = _STATE.get("feeders")
    if feeders is not None:
        feeders.terminate()
        feeders.join()
    _STATE.clear()


def worker_device() -> str | None:
    return _STATE.get("device")


def set_progress(progress) -> None:
    """In-process builds report to this :class:`~soda_mega.data.write.progress.Progress` directly."""
    _STATE["progress"] = progress


def _report(records: int, seconds: float = 0.0, skipped: int = 0) -> None:
    q = _STATE.get("queue")
    if q is not None:
        q.put(("progress", records, seconds, skipped))
    elif _STATE.get("progress") is not None:
        _STATE["progress"].advance(records, seconds, skipped)


def _skip(writer: UnitWriter, split: str, record: str, reason: str) -> None:
    print(f"[soda-mega data] skipped {record}: {reason}", file=sys.stderr, flush=True)
    writer.stats[split].skipped.append(Skipped(record, reason).to_dict())


def _encode_text(text: str) -> list[int]:
    try:
        return _STATE["tokenizer"].encode(text)
    except UnicodeEncodeError as err:
        raise InputError(f"text is not valid Unicode ({err.reason} at {err.start})") from None


def _recording_docs(rec: Recording, codes: np.ndarray, frame_rate: float, seconds: float):
    """The documents of one recording; ``seconds`` is its audio's length (the samples' for audio,
    the frames' for pre-encoded codes). A segment ending after it (beyond the slack Lhotse
    allows a cut, :data:`SLICE_END_TOLERANCE_S`) is a bad record, as the Lhotse path refuses a
    supervision outside its cut: it was written for other audio."""
    spec: WorkerSpec = _STATE["spec"]
    num_frames = codes.shape[1]
    segments = None
    if rec.segments:
        segments = []
        for seg in rec.segments:
            first, stop = segment_frames(seg.start, seg.end, frame_rate, num_frames)
            if first >= num_frames:
                raise InputError(f"segment at {seg.start:.2f} s starts after the end of the audio "
                                 f"({num_frames / frame_rate:.2f} s)")
            if seg.end is not None and seg.end > seconds + SLICE_END_TOLERANCE_S:
                raise InputError(f"segment {seg.start:.2f}-{seg.end:.2f} s ends after the end of the audio "
                                 f"({seconds:.2f} s)")
            if stop <= first:
                raise InputError(f"segment {seg.start:.2f}-{seg.end} s covers no audio frame")
            segments.append((first, stop, _encode_text(seg.text)))
    docs = recording_documents(_STATE["layout"], rec.record_id, codes, segments, spec.doc_types)
    if not docs:
        raise InputError("no transcript, and data.doc_types has no audio-only type "
                         "(speech_only, semantic_only) to build from untranscribed audio")
    return docs


def _frame_rate() -> float:
    codec = _STATE["codec"]
    return codec.frame_rate if codec else MIMI_FRAME_RATE


def _batch_size() -> int:
    codec = _STATE["codec"]
    return codec.batch_size if codec else 1


# ----------------------------------------------------------------- feeders (device path)
def init_feeder(max_record_audio_bytes: int) -> None:
    """A feeder process's set-up (after it armed its parent-death signal: see ``init_worker``)."""
    import torch

    torch.set_num_threads(1)
    set_max_record_audio_bytes(max_record_audio_bytes)


def decode_for_codec(path) -> tuple[np.ndarray | InputError, float]:
    """A feeder's job: audio file (or reference, see :func:`~soda_mega.data.write.inputs.load_audio`) ->
    (mono float32 at Mimi's 24 kHz, seconds), or the InputError."""
    try:
        wav, rate = load_audio(path)
    except InputError as err:
        return err, 0.0
    return to_mono(wav, rate, MIMI_SAMPLE_RATE), wav.shape[1] / rate


def _prefetch(paths: Sequence[str | None]) -> None:
    """Hand every audio file of a unit to the feeders now, so decoding runs ahead of the codec."""
    feeders = _STATE.get("feeders")
    if feeders is None:
        return
    pending: dict[str, list] = _STATE["prefetch"]
    pending.clear()
    for path in paths:
        if path is not None:
            pending.setdefault(path, []).append(feeders.apply_async(decode_for_codec, (path,)))


def _read_audio(path) -> tuple[tuple[np.ndarray, int] | InputError, float]:
    queued = _STATE["prefetch"].get(path)
    if queued or _STATE.get("feeders") is not None:
        job = queued.pop(0) if queued else _STATE["feeders"].apply_async(decode_for_codec, (path,))
        mono, seconds = job.get()
        return (mono if isinstance(mono, InputError) else (mono, MIMI_SAMPLE_RATE)), seconds
    try:
        wav, rate = load_audio(path)
    except InputError as err:
        return err, 0.0
    return (wav, rate), wav.shape[1] / rate


def _load_codes(sources: Sequence[tuple[str | None, str | None]]) -> list[tuple]:
    """``(codes [K, T] | InputError, seconds)`` for each ``(audio file, codes file)`` source.

    Pre-encoded codes are read and checked; all audio files of the list are encoded in one
    :meth:`~soda_mega.data.codec.MimiCodec.encode_batch` call (padded GPU batches of
    ``data.encode_batch_size``). An unusable source comes back as its ``InputError``.
    """
    layout: VocabLayout = _STATE["layout"]
    loaded: list[list] = []  # [codes | (wav, rate) | InputError, seconds]
    for audio, codes_path in sources:
        if codes_path is not None:
            try:
                codes = load_codes(codes_path, layout.num_codebooks, layout.codebook_size)
                loaded.append([codes, codes.shape[1] / _frame_rate()])
            except InputError as err:
                loaded.append([err, 0.0])
        else:
            loaded.append(list(_read_audio(audio)))
    todo = [item for item in loaded if isinstance(item[0], tuple)]
    if todo:
        encoded = _STATE["codec"].encode_batch([i[0][0] for i in todo], [i[0][1] for i in todo])
        for item, codes in zip(todo, encoded):
            item[0] = codes.numpy()
    return [tuple(item) for item in loaded]


# ----------------------------------------------------------------- units
def _speech_unit(writer: UnitWriter, recordings: Sequence[Recording]) -> None:
    spec: WorkerSpec = _STATE["spec"]
    frame_rate = _frame_rate()
    batch = _batch_size()
    _prefetch([r.audio for r in recordings])
    for start in range(0, len(recordings), batch):
        group = recordings[start:start + batch]
        sides = _load_codes([(r.audio, r.codes) for r in group])
        for rec, (codes, seconds) in zip(group, sides):
            split = record_split(rec, spec.valid_fraction)
            name = f"{rec.record_id} ({rec.where})"
            try:
                if isinstance(codes, InputError):
                    raise codes
                docs = _recording_docs(rec, codes, frame_rate, seconds)
            except InputError as err:
                _skip(writer, split, name, str(err))
                _report(1, 0.0, 1)
                continue
            for doc in docs:
                writer.write(split, doc)
            writer.stats[split].num_records += 1
            writer.stats[split].audio_seconds += seconds
            _report(1, seconds)


def _s2st_unit(writer: UnitWriter, pairs: Sequence[S2STPair]) -> None:
    spec: WorkerSpec = _STATE["spec"]
    batch = _batch_size()
    _prefetch([a for p in pairs for a in (p.source_audio, p.target_audio)])
    for start in range(0, len(pairs), batch):
        group = pairs[start:start + batch]
        sides = _load_codes([side for p in group for side in ((p.source_audio, p.source_codes),
                                                                (p.target_audio, p.target_codes))])
        for i, pair in enumerate(group):
            (src, src_s), (tgt, tgt_s) = sides[2 * i], sides[2 * i + 1]
            split = record_split(pair, spec.valid_fraction)
            try:
                for side, codes in (("source", src), ("target", tgt)):
                    if isinstance(codes, InputError):
                        raise InputError(f"{side}: {codes}")
                doc = s2st_document(_STATE["layout"], pair.record_id, src,
                                    _encode_text(pair.source_text), _encode_text(pair.target_text), tgt)
            except InputError as err:
                _skip(writer, split, f"{pair.record_id} ({pair.where})", str(err))
                _report(1, 0.0, 1)
                continue
            writer.write(split, doc)
            writer.stats[split].num_records += 1
            writer.stats[split].audio_seconds += src_s + tgt_s
            _report(1, src_s + tgt_s)


def _text_unit(writer: UnitWriter, ranges: Sequence[TextRange]) -> None:
    spec: WorkerSpec = _STATE["spec"]
    pending = 0
    for r in ranges:
        for item in read_text_range(r):
            if isinstance(item, Skipped):
                _skip(writer, split_of(item.record, spec.valid_fraction), item.record, item.reason)
                _report(pending + 1, 0.0, 1)
                pending = 0
                continue
            split = split_of(item.record_id, spec.valid_fraction)
            try:
                doc = text_document(_STATE["layout"], item.record_id, _encode_text(item.text))
            except InputError as err:
                _skip(writer, split, item.record_id, str(err))
                _report(pending + 1, 0.0, 1)
                pending = 0
                continue
            writer.write(split, doc)
            writer.stats[split].num_records += 1
            pending += 1
            if pending >= 256:
                _report(pending)
                pending = 0
    if pending:
        _report(pending)


def run_unit(name: str, items: Sequence) -> dict:
    """Build one work unit and mark it complete; returns who built it (unit, pid, device)."""
    spec: WorkerSpec = _STATE["spec"]
    writer = UnitWriter(_STATE["target"], name, _STATE["layout"], spec.shard_size_limit)
    {"speech": _speech_unit, "text": _text_unit, "s2st": _s2st_unit}[spec.kind](writer, items)
    writer.commit()
    return {"unit": name, "pid": os.getpid(), "device": _STATE["device"]}
