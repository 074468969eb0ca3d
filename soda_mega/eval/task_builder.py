"""Small evaluation sets cut from a speech manifest with segments (e.g. the demo corpus).

SODA's benchmarks (sWUGGY, sBLIMP, Salmon, LibriSpeech ASR/TTS) are not shipped; this builds
tasks of the same *format* from recordings the user has, so every evaluation command can run
end to end on the demo corpus:

* ``utterances.jsonl``: one WAV per segment with its transcript (``{"id", "audio", "text"}``),
  the manifest of ``soda-mega eval asr / tts / speech``;
* ``pairs.jsonl``: a window of each utterance (``pair_seconds`` from its middle, word-sized
  like sWUGGY's items, so it fits a small model's context) against its time-reversed copy
  (same spectrum and speaker, no longer speech), the manifest of ``soda-mega eval pairs``.
  A model that has learned anything about speech prefers the forward recording.

With ``split="valid"`` only recordings that the data builder holds out (the same groups and
hash, :mod:`soda_mega.data.write.splits`: by recording, or by speaker with ``split_by``) are
used, so a model trained on that corpus is evaluated on audio it has not seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from soda_mega.data.codec import MIMI_SAMPLE_RATE, to_mono
from soda_mega.data.read.inspect import write_wav
from soda_mega.data.write.inputs import InputError, read_audio, read_manifest
from soda_mega.data.write.splits import assign_groups, record_split
from soda_mega.data.write.writer import atomic_write_text


@dataclass
class BuiltTasks:
    utterances: Path
    pairs: Path
    count: int
    skipped: list[str]


def build_tasks(manifest: str | Path, out: str | Path, split: str = "all", valid_fraction: float = 0.1,
                limit: int | None = None, min_seconds: float = 0.5,
                pair_seconds: float | None = 1.0, split_by: str = "recording") -> BuiltTasks:
    """Cut every transcribed segment of ``manifest`` into ``out``; returns the two manifests."""
    if split not in ("all", "train", "valid"):
        raise ValueError(f"split must be all, train or valid, got {split!r}")
    out = Path(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    recordings, bad = read_manifest(manifest)
    recordings = assign_groups(recordings, split_by)
    skipped = [f"{s.record}: {s.reason}" for s in bad]
    utterances, pairs = [], []
    for rec in recordings:
        if split != "all" and record_split(rec, valid_fraction) != split:
            continue
        if rec.audio is None or not rec.segments:
            skipped.append(f"{rec.record_id}: needs audio with transcribed segments")
            continue
        try:
            wav, rate = read_audio(rec.audio)
        except InputError as err:
            skipped.append(f"{rec.record_id}: {err}")
            continue
        mono = torch.from_numpy(to_mono(wav, rate, MIMI_SAMPLE_RATE))
        for i, seg in enumerate(rec.segments):
            end = seg.end if seg.end is not None else mono.shape[-1] / MIMI_SAMPLE_RATE
            if end - seg.start < min_seconds or not seg.text.strip():
                continue
            piece = mono[int(seg.start * MIMI_SAMPLE_RATE):int(end * MIMI_SAMPLE_RATE)]
            uid = f"{rec.record_id.replace('/', '_')}_{i}"
            utt = out / "audio" / f"{uid}.wav"
            write_wav(utt, piece, MIMI_SAMPLE_RATE)
            utterances.append({"id": uid, "audio": f"audio/{utt.name}", "text": seg.text})
            window = piece
            if pair_seconds is not None and piece.shape[0] > pair_seconds * MIMI_SAMPLE_RATE:
                n = int(pair_seconds * MIMI_SAMPLE_RATE)
                first = (piece.shape[0] - n) // 2
                window = piece[first:first + n]
            fwd, rev = out / "audio" / f"{uid}_pair.wav", out / "audio" / f"{uid}_pair_reversed.wav"
            write_wav(fwd, window, MIMI_SAMPLE_RATE)
            write_wav(rev, window.flip(0), MIMI_SAMPLE_RATE)
            pairs.append({"id": uid, "positive": f"audio/{fwd.name}", "negative": f"audio/{rev.name}"})
            if limit is not None and len(utterances) >= limit:
                break
        if limit is not None and len(utterances) >= limit:
            break
    if not utterances:
        raise InputError(f"{manifest}: no transcribed segment of at least {min_seconds} s "
                         f"in split {split!r}")
    for name, rows in (("utterances.jsonl", utterances), ("pairs.jsonl", pairs)):
        atomic_write_text(out / name, "".join(json.dumps(r) + "\n" for r in rows))
    return BuiltTasks(out / "utterances.jsonl", out / "pairs.jsonl", len(utterances), skipped)
