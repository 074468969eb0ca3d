"""Lhotse manifests as a recording source of ``data build --lhotse CUTS``.

A cut manifest (``cuts.jsonl.gz``, what k2-icefall / NeMo recipes write), or a recording manifest
and a supervision manifest (``--lhotse-recordings R --lhotse-supervisions S``: one cut per
recording, as ``CutSet.from_manifests`` makes them), read through the ``lhotse`` library
(optional: ``pip install lhotse``).

Each cut is one recording of the build: id = the cut's id (its Lhotse recording, and the
supervisions' speakers, decide its train/valid split: :mod:`~soda_mega.data.write.splits`);
audio = the cut's stretch of its recording (``start`` / ``duration`` seconds, cut at whole samples
as Lhotse counts them: a cut of a longer recording is read as that part only, an
:class:`~soda_mega.data.write.inputs.AudioSlice`; consecutive cuts of one recording decode it
once);
transcript segments = the cut's supervisions that have text, with ``start`` / ``end`` relative to
the cut. A cut without any supervision text is untranscribed audio (audio-only document types).
The cut ``{"start": 1.2, "duration": 1.4, "supervisions": [{"start": 0.1, "duration": 0.6, "text":
"hi"}]}`` of ``long.wav`` builds the same documents as the manifest line ``{"id": ..., "audio":
"part.wav", "segments": [{"start": 0.1, "end": 0.7, "text": "hi"}]}`` where ``part.wav`` holds
those samples.

Audio must be one local file per recording (``type: "file"``; paths relative to the current
folder, as Lhotse resolves them) holding all channels the cut uses; cuts of other kinds (mixed,
padding, URL / in-memory / command sources, recordings with transforms such as speed
perturbation, a subset of a recording's channels, supervisions that run outside the cut) are
named and skipped. The fingerprint covers the manifests' bytes, not the audio files' (as for
JSONL manifests).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from soda_mega.data.write.inputs import (
    SLICE_END_TOLERANCE_S,
    AudioSlice,
    InputError,
    Recording,
    Skipped,
    SourceError,
    parse_record,
)

# A cut that starts at 0 and lasts as long as its recording (within this) is the whole file.
WHOLE_RECORDING_TOLERANCE_S = 1e-6


def import_lhotse():
    try:
        import lhotse
    except ImportError:
        raise SourceError("--lhotse needs the `lhotse` package: pip install lhotse") from None
    return lhotse


@dataclass(frozen=True)
class LhotseSource:
    """A cut manifest, or a recording + supervision manifest pair."""

    cuts: str | None = None
    recordings: str | None = None
    supervisions: str | None = None

    def __post_init__(self) -> None:
        if (self.cuts is None) == (self.recordings is None):
            raise SourceError("give a Lhotse cut manifest (--lhotse CUTS), or recordings and supervisions "
                              "(--lhotse-recordings R --lhotse-supervisions S), not both")
        if self.recordings is not None and self.supervisions is None:
            raise SourceError("--lhotse-recordings needs --lhotse-supervisions (the transcripts)")
        for flag, path in self.files():
            if not Path(path).is_file():
                raise SourceError(f"{flag} {path}: no such file")

    def files(self) -> list[tuple[str, str]]:
        if self.cuts is not None:
            return [("--lhotse", self.cuts)]
        return [("--lhotse-recordings", self.recordings), ("--lhotse-supervisions", self.supervisions)]

    def _cuts(self):
        """The cuts, one at a time (a JSONL cut manifest is read lazily, line by line)."""
        lhotse = import_lhotse()
        if self.cuts is not None:
            if ".jsonl" in Path(self.cuts).name:
                yield from lhotse.CutSet.from_jsonl_lazy(self.cuts)
            else:
                yield from lhotse.CutSet.from_file(self.cuts)
        else:
            yield from lhotse.CutSet.from_manifests(
                recordings=lhotse.RecordingSet.from_file(self.recordings),
                supervisions=lhotse.SupervisionSet.from_file(self.supervisions))

    def plan(self) -> tuple[list[Recording], list[Skipped], dict]:
        """Every usable cut as a :class:`Recording`, the cuts that cannot be used, and the
        fingerprint (the manifests' bytes)."""
        from soda_mega.data.codec import file_sha256

        name = Path(self.cuts or self.supervisions).name
        recordings: list[Recording] = []
        skipped: list[Skipped] = []
        seen: dict[str, str] = {}
        cuts = self._cuts()
        for i in itertools.count():
            try:
                cut = next(cuts)
            except StopIteration:
                break
            except SourceError:
                raise
            except Exception as err:  # lhotse's ValueError / KeyError / JSON errors on a bad manifest
                shown = " + ".join(p for _, p in self.files())
                raise SourceError(f"Lhotse manifest {shown} cannot be read (at cut {i + 1}: "
                                  f"{type(err).__name__}: {err})") from None
            where = f"{name}:{i + 1}" if self.cuts is not None else f"{name}:recording {cut.id}"
            try:
                rec = cut_recording(cut, where)
            except InputError as err:
                skipped.append(Skipped(f"{cut.id} ({where})", str(err)))
                continue
            if rec.record_id in seen:
                skipped.append(Skipped(f"{rec.record_id} ({where})",
                                       f"duplicate cut id, first used at {seen[rec.record_id]}"))
                continue
            seen[rec.record_id] = where
            recordings.append(rec)
        fingerprint = {"lhotse": [{"flag": flag, "path": str(Path(p).resolve()), "sha256": file_sha256(p)}
                                  for flag, p in self.files()]}
        return recordings, skipped, fingerprint


def cut_recording(cut, where: str) -> Recording:
    """One Lhotse cut -> :class:`Recording`; :class:`InputError` saying why it cannot be used."""
    lhotse = import_lhotse()
    if not isinstance(cut, (lhotse.MonoCut, lhotse.MultiCut)):
        raise InputError(f"{type(cut).__name__} is not supported (only cuts of one recording: MonoCut, MultiCut)")
    rec = cut.recording
    if rec is None:
        raise InputError("the cut has no recording (features-only cuts are not supported)")
    if rec.transforms:
        raise InputError(f"recording {rec.id} has transforms (speed / volume perturbation, ...): give "
                         "the cuts without them")
    if len(rec.sources) != 1 or rec.sources[0].type != "file":
        kinds = ", ".join(s.type for s in rec.sources)
        raise InputError(f"recording {rec.id}: audio sources [{kinds}]; only one local file per recording "
                         "(type 'file') is read")
    channels = cut.channel if isinstance(cut.channel, list) else [cut.channel]
    if sorted(channels) != sorted(rec.channel_ids):
        raise InputError(f"the cut uses channel(s) {channels} of recording {rec.id} with channels "
                         f"{rec.channel_ids}; soda-mega reads all channels of a file (mixed to mono)")
    source = rec.sources[0].source
    if not isinstance(source, str) or "\0" in source:
        raise InputError(f"recording {rec.id}: the audio source {source!r} is not a file path")
    path = str(Path(source).resolve())
    # NOTE: checked here, by the cut's numbers, not left to the slice: a negative start would
    # index the samples from their end.
    start, duration = float(cut.start), float(cut.duration)
    if not start >= -WHOLE_RECORDING_TOLERANCE_S:
        raise InputError(f"the cut starts at {start:.3f} s, before the start of recording {rec.id}")
    if not duration > 0:
        raise InputError(f"the cut lasts {duration:.3f} s; it must last more than 0 s")
    if not start + duration <= float(rec.duration) + SLICE_END_TOLERANCE_S:
        raise InputError(f"the cut ends at {start + duration:.3f} s, after the end of recording {rec.id} "
                         f"({float(rec.duration):.3f} s)")
    segments = []
    for sup in cut.supervisions:
        if sup.text is None:
            continue
        if sup.start < -WHOLE_RECORDING_TOLERANCE_S or sup.end > cut.duration + 1e-3:
            raise InputError(f"supervision {sup.id} ({sup.start:.3f}-{sup.end:.3f} s) runs outside the cut "
                             f"(0-{cut.duration:.3f} s): trim the cuts to their supervisions first "
                             "(CutSet.trim_to_supervisions)")
        segments.append({"start": max(0.0, float(sup.start)), "end": min(float(sup.end), float(cut.duration)),
                         "text": sup.text})
    obj = {"id": cut.id, "audio": path}
    if segments:
        obj["segments"] = segments
    # NOTE: the split goes by the cut's recording (and its supervisions' speakers), never by the
    # cut id: the cuts of trim_to_supervisions() of one recording stay in one split.
    speakers = tuple(sorted({str(sup.speaker) for sup in cut.supervisions if sup.speaker not in (None, "")}))
    parsed = dataclasses.replace(parse_record(obj, where, Path("/"), ""), recording=str(rec.id), speakers=speakers)
    whole = (abs(start) <= WHOLE_RECORDING_TOLERANCE_S
             and abs(duration - rec.duration) <= WHOLE_RECORDING_TOLERANCE_S)
    if whole:
        return parsed
    return dataclasses.replace(parsed, audio=AudioSlice(path, max(0.0, start), duration))
