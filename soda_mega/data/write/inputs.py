"""Readers for the inputs users have: recording manifests, audio, pre-encoded codes, text corpora.

**Recording manifest** (JSONL, one recording per line; blank lines ignored)::

    {"id": "spk1/utt7", "audio": "wavs/utt7.wav", "transcript": "Hello there."}
    {"audio": "long/talk.flac", "segments": [{"start": 0.0, "end": 2.4, "text": "Hello."},
                                              {"start": 2.9, "end": 6.1, "text": "How are you?"}]}
    {"codes": "codes/utt9.npy", "transcript": "Pre-encoded, skips the codec."}
    {"audio": "music/untranscribed.wav"}

* ``audio`` or ``codes`` (exactly one): a path relative to the manifest's folder (or absolute).
  ``codes`` is a ``.npy`` integer array ``[K', T]`` at the codec's frame rate (12.5/s) with
  ``K' >= K`` (the first K are kept: residual codebooks stay valid when cut) and values in
  ``[0, codebook_size)``.
* ``transcript`` (one segment spanning the whole recording) or ``segments`` (``start``/``end``
  in seconds, ``0 <= start < end``, ending by the end of the audio (25 ms of slack, as Lhotse
  allows a cut), non-empty ``text``; sorted by start). With neither, only
  the audio-only document types (speech_only, semantic_only) are built for the recording.
* ``id``: optional; by default ``<manifest stem>/<audio or codes path as written>``; a repeated
  id is skipped.
* ``recording_id`` / ``speaker``: optional; the train/valid split goes by recording (default: the
  audio or codes path as written), so lines that cut one recording into segments stay in one
  split; ``data.split_by=speaker`` keeps speakers apart too (:mod:`.splits`).

**S2ST manifest** (JSONL, one speech-to-speech translation pair per line; SODA_SPEC section 6)::

    {"id": "p1", "source_audio": "en/p1.wav", "source_text": "Good morning.",
     "target_text": "Bonjour.", "target_audio": "fr/p1.wav"}
    {"source_codes": "codes/p2.en.npy", "source_text": "...", "target_text": "...",
     "target_codes": "codes/p2.fr.npy"}

* ``source_audio`` or ``source_codes`` and ``target_audio`` or ``target_codes`` (exactly one
  per side): paths as above, codes as above.
* ``source_text`` / ``target_text``: non-empty transcripts of the two sides.
* ``id``: optional; by default ``<manifest stem>/<source path>|<target path>`` (one source may be
  translated into several targets: the pairs of one source, or ``recording_id``, share a split).
  ``speaker`` as above; other keys (a language tag) are ignored.

**Audio** is read with ``sphn`` (Rust symphonia decoders: WAV PCM 8/16/24/32-bit and float,
FLAC, MP3, Ogg/Vorbis): one reader for every format users have, returning float32
``[channels, samples]``, where the stdlib ``wave`` module would only cover integer-PCM WAV.
Unreadable files, zero samples, non-finite samples and sample rates outside 8 kHz .. 384 kHz
(the highest rate of studio audio; a header declaring 0 Hz or 2^31 Hz is a broken or hostile
file, not audio) are bad input, whatever the decoder makes of them: a WAV header is checked
before decoding (sphn panics on a rate of 0), and a decoder failure of any kind, a Rust panic
included, is the record's :class:`InputError`. A recording is read whole (4 bytes x rate x
seconds x channels of memory), and only when that fits ``data.max_record_audio_bytes``
(default 1 GiB): the header is checked first, and decoding stops at that bound whatever the
header says.

**Other recording sources** give the same :class:`Recording` records: a local Hugging Face
dataset (:mod:`.hf_input`, ``--hf-dataset``) and Lhotse manifests (:mod:`.lhotse_input`,
``--lhotse``). Their ``audio`` is a small reference read by :func:`load_audio` (a dataset row,
an :class:`AudioSlice` of a longer file), so records stay cheap to pickle to workers.

**Text corpus**: ``.jsonl`` / ``.json`` files hold one ``{"text": ..., "id": optional}`` object
per line; any other file is plain UTF-8 text, one document per blank-line-separated paragraph
(``data.text_split=paragraph``, the default; the paragraph's lines are joined with newlines)
or one document per non-empty line (``data.text_split=line``). Default ids are
``<file name>:<first line number>``. Text corpora are read in byte ranges so that a
planner can cut a large file into work units without holding it in memory.

Every problem with one record raises :class:`InputError` (or comes back as :class:`Skipped`)
with a message naming the record; the builder counts and skips it and goes on.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from soda_mega.config.schema import MAX_RECORD_AUDIO_BYTES
from soda_mega.errors import SodaUserError
from soda_mega.utils import strict_json

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 384_000
_max_audio_bytes = MAX_RECORD_AUDIO_BYTES  # see set_max_record_audio_bytes
JSONL_SUFFIXES = (".jsonl", ".json")
T = TypeVar("T")  # a parsed manifest line: Recording or S2STPair


class InputError(SodaUserError, ValueError):
    """One input record is unusable; the message says which and why."""


class SourceError(SodaUserError, ValueError):
    """An input source as a whole (a dataset, a manifest) cannot be read; the message names it and
    says what to do."""


@dataclass(frozen=True)
class Skipped:
    """A bad input record that the build left out."""

    record: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Segment:
    """One transcribed stretch of a recording; ``end=None`` runs to the end of the audio."""

    start: float
    end: float | None
    text: str


@dataclass(frozen=True)
class Recording:
    """One manifest line: where the audio (or codes) is and what was said.

    ``audio`` is a file path, or a small picklable reference read by :func:`load_audio`
    (an :class:`AudioSlice` of a file, a row of a Hugging Face dataset), never the samples."""

    record_id: str
    where: str  # "<manifest>:<line>", for messages
    audio: str | object | None  # a file path, or a reference with a read() method
    codes: str | None
    segments: tuple[Segment, ...] | None  # None: untranscribed
    # The train/valid split goes by recording (or speaker), never by record id: .splits
    recording: str | None = None  # None: the record is its own recording
    speakers: tuple[str, ...] = ()
    group: str | None = None  # the split key, set when the build is planned


@dataclass(frozen=True)
class S2STPair:
    """One S2ST manifest line: both sides' audio (or codes) and transcripts."""

    record_id: str
    where: str  # "<manifest>:<line>", for messages
    source_audio: str | None
    source_codes: str | None
    source_text: str
    target_text: str
    target_audio: str | None
    target_codes: str | None
    recording: str | None = None  # the source recording (the split key, see .splits)
    speakers: tuple[str, ...] = ()
    group: str | None = None


# ----------------------------------------------------------------- manifests
def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{what} must be a finite number of seconds, got {value!r}")
    return float(value)


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{what} must be a non-empty string, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{what} is not valid Unicode text ({err.reason} at {err.start})") from None
    return value.strip()


def parse_record(obj, where: str, base: Path, default_prefix: str) -> Recording:
    """One manifest object -> :class:`Recording` (paths resolved against ``base``)."""
    if not isinstance(obj, dict):
        raise InputError(f"a manifest line must be a JSON object, got {type(obj).__name__}")
    has_audio, has_codes = "audio" in obj, "codes" in obj
    if has_audio == has_codes:
        raise InputError("give exactly one of 'audio' (a file) or 'codes' (a .npy file)")
    key = "audio" if has_audio else "codes"
    rel = obj[key]
    if not isinstance(rel, str) or not rel:
        raise InputError(f"'{key}' must be a path string, got {rel!r}")
    path = _resolve(base, rel)
    if "transcript" in obj and "segments" in obj:
        raise InputError("give either 'transcript' or 'segments', not both")
    segments: tuple[Segment, ...] | None = None
    if "transcript" in obj:
        segments = (Segment(0.0, None, _text(obj["transcript"], "'transcript'")),)
    elif "segments" in obj:
        raw = obj["segments"]
        if not isinstance(raw, list) or not raw:
            raise InputError("'segments' must be a non-empty list of {start, end, text}")
        parsed = []
        for i, seg in enumerate(raw):
            what = f"segments[{i}]"
            if not isinstance(seg, dict) or not {"start", "end", "text"} <= set(seg):
                raise InputError(f"{what} must be an object with start, end and text")
            start, end = _number(seg["start"], f"{what}.start"), _number(seg["end"], f"{what}.end")
            if not 0 <= start < end:
                raise InputError(f"{what}: need 0 <= start < end, got start={start} end={end}")
            parsed.append(Segment(start, end, _text(seg["text"], f"{what}.text")))
        segments = tuple(sorted(parsed, key=lambda s: (s.start, s.end)))
    rid = obj.get("id", f"{default_prefix}/{rel}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        raise InputError(f"'id' must be a non-empty string or integer, got {rid!r}")
    return Recording(str(rid), where, path if has_audio else None, None if has_audio else path, segments,
                     *_split_fields(obj, rel))


def _split_fields(obj: dict, rel: str) -> tuple[str, tuple[str, ...]]:
    """``(recording, speakers)`` of a manifest line: ``recording_id`` (else the audio path as
    written) and ``speaker``, the keys the train/valid split goes by (:mod:`.splits`)."""
    found = []
    for key in ("recording_id", "speaker"):
        value = obj.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == ""):
            raise InputError(f"'{key}' must be a non-empty string or integer, got {value!r}")
        found.append(None if value is None else str(value))
    return found[0] or os.path.normpath(rel), (found[1],) if found[1] is not None else ()


def _resolve(base: Path, rel: str) -> str:
    if "\0" in rel:  # no file system takes it; os.path raises ValueError on it
        raise InputError(f"path {rel!r} holds a NUL character")
    return str((base / rel).resolve()) if not Path(rel).is_absolute() else rel


def _audio_or_codes(obj: dict, side: str, base: Path) -> tuple[str | None, str | None, str]:
    """``(audio path, codes path, path as written)`` of one side of an S2ST pair."""
    audio_key, codes_key = f"{side}_audio", f"{side}_codes"
    if (audio_key in obj) == (codes_key in obj):
        raise InputError(f"give exactly one of '{audio_key}' (a file) or '{codes_key}' (a .npy file)")
    key = audio_key if audio_key in obj else codes_key
    rel = obj[key]
    if not isinstance(rel, str) or not rel:
        raise InputError(f"'{key}' must be a path string, got {rel!r}")
    path = _resolve(base, rel)
    return (path, None, rel) if key == audio_key else (None, path, rel)


def parse_s2st_record(obj, where: str, base: Path, default_prefix: str) -> S2STPair:
    """One S2ST manifest object -> :class:`S2STPair` (paths resolved against ``base``)."""
    if not isinstance(obj, dict):
        raise InputError(f"an S2ST manifest line must be a JSON object, got {type(obj).__name__}")
    src_audio, src_codes, src_rel = _audio_or_codes(obj, "source", base)
    tgt_audio, tgt_codes, tgt_rel = _audio_or_codes(obj, "target", base)
    source_text = _text(obj.get("source_text"), "'source_text'")
    target_text = _text(obj.get("target_text"), "'target_text'")
    rid = obj.get("id", f"{default_prefix}/{src_rel}|{tgt_rel}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        raise InputError(f"'id' must be a non-empty string or integer, got {rid!r}")
    return S2STPair(str(rid), where, src_audio, src_codes, source_text, target_text, tgt_audio, tgt_codes,
                    *_split_fields(obj, src_rel))


def _json_line(text: str) -> object:
    """One line of a JSONL input. NOTE: a line nested too deeply or holding a 5,000-digit
    integer is one bad line like any other (an InputError, skipped and named), never an error
    that stops the whole build."""
    try:
        return strict_json.loads(text)
    except strict_json.JSONProblem as err:
        raise InputError(str(err)) from None


def _read_jsonl(path: str | Path, parse: Callable[[object, str, Path, str], T]
                ) -> tuple[list[T], list[Skipped]]:
    """``parse(obj, where, base, stem)`` of every non-blank line of a JSONL manifest; lines that
    are not UTF-8, not JSON, rejected by ``parse`` or repeat an earlier id come back as skipped."""
    path = Path(path)
    base = path.resolve().parent
    records: list[T] = []
    skipped: list[Skipped] = []
    seen: dict[str, str] = {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path.name}:{line_no}"
            if not raw.strip():
                continue
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise InputError(f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                     f"{err.start + 1})") from None
                obj = _json_line(text)
                rec = parse(obj, where, base, path.stem)
            except InputError as err:
                skipped.append(Skipped(where, str(err)))
                continue
            if rec.record_id in seen:
                skipped.append(Skipped(f"{rec.record_id} ({where})",
                                       f"duplicate record id, first used at {seen[rec.record_id]}; "
                                       "give each line a unique 'id'"))
                continue
            seen[rec.record_id] = where
            records.append(rec)
    return records, skipped


def read_manifest(path: str | Path) -> tuple[list[Recording], list[Skipped]]:
    """All recordings of a JSONL manifest, and the lines that could not be used."""
    return _read_jsonl(path, parse_record)


def read_s2st_manifest(path: str | Path) -> tuple[list[S2STPair], list[Skipped]]:
    """All pairs of a JSONL S2ST manifest, and the lines that could not be used."""
    return _read_jsonl(path, parse_s2st_record)


# ----------------------------------------------------------------- audio and codes
def set_max_record_audio_bytes(limit: int) -> None:
    """This process's bound on the decoded audio of one record (``data.max_record_audio_bytes``:
    a build worker and its feeders set it from the build's config)."""
    global _max_audio_bytes
    _max_audio_bytes = int(limit)


@contextlib.contextmanager
def _decoder_errors(name: str):
    """The decoder's failures, a Rust panic included, as the record's :class:`InputError`."""
    try:
        yield
    except Exception as err:  # sphn raises ValueError / OSError with the decoder's message
        raise InputError(f"cannot decode audio {name}: {err}") from None
    except BaseException as err:
        # NOTE: a panic in sphn's Rust decoders reaches Python as pyo3's PanicException, a
        # BaseException (so that `except Exception` does not swallow it). For one file it is that
        # file's problem; KeyboardInterrupt, SystemExit and the like go on.
        if type(err).__name__ != "PanicException":
            raise
        raise InputError(f"cannot decode audio {name}: the decoder failed ({err})") from None


def _too_long(name: str, seconds: float, rate: int, channels: int, limit: int) -> InputError:
    return InputError(f"audio {name}: {seconds:.1f} s at {rate} Hz x {channels} channel(s) decodes "
                      f"to {4 * channels * round(seconds * rate):,} bytes, more than "
                      f"data.max_record_audio_bytes={limit:,} (raise it for recordings this long)")


def read_audio(path: str | Path, name: str | None = None) -> tuple[np.ndarray, int]:
    """Float32 ``[channels, samples]`` and the sample rate; :class:`InputError` when unusable.

    ``name`` is what messages call the audio (default: the file name). The header's rate,
    channels and length are checked before anything is decoded, and decoding stops at this
    process's bound on decoded audio (:func:`set_max_record_audio_bytes`) whatever the header
    says: a few MB of FLAC silence that declare 20 minutes at 384 kHz are refused unread."""
    import sphn

    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise InputError(f"audio file not found: {path}")
    check_wav_header(path, name)
    limit = _max_audio_bytes
    with _decoder_errors(name):
        reader = sphn.FileReader(str(path))
        rate, channels, seconds = int(reader.sample_rate), int(reader.channels), float(reader.duration_sec)
        del reader
    check_sample_rate(rate, name)
    channels = max(channels, 1)
    most = limit // (4 * channels)  # samples per channel
    if seconds * rate > most:
        raise _too_long(name, seconds, rate, channels, limit)
    with _decoder_errors(name):
        # One sample past the bound: a header that understated the length shows as the excess.
        wav, sample_rate = sphn.read(str(path), duration_sec=(most + 1) / rate)
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 2 or wav.shape[-1] == 0:
        raise InputError(f"audio {name} is empty (0 samples)")
    check_sample_rate(sample_rate, name)
    if wav.size > limit // 4:
        raise _too_long(name, wav.shape[-1] / sample_rate, sample_rate, wav.shape[0], limit)
    if not np.isfinite(wav).all():
        raise InputError(f"audio {name} has NaN or infinite samples (wrong sample format?)")
    return wav, int(sample_rate)


def read_audio_bytes(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """:func:`read_audio` of an encoded audio file held in memory (a Hugging Face ``Audio``
    cell): written to a temporary file and decoded by the same reader, so the samples equal
    those of the same file on disk. ``name`` names the audio in messages."""
    import tempfile

    if not data:
        raise InputError(f"audio {name} is empty (0 bytes)")
    # NOTE: the default temporary folder (TMPDIR), not /dev/shm: containers often cap that at
    # 64 MiB, less than one long FLAC file.
    with tempfile.NamedTemporaryFile(suffix=".audio") as f:
        f.write(data)
        f.flush()
        return read_audio(f.name, name)


# Lhotse's default tolerance for a cut that ends a little after its recording's last sample.
SLICE_END_TOLERANCE_S = 0.025


# The last file an AudioSlice decoded, by path, size and modification time: cuts of one long
# recording come one after another (a unit is a run of consecutive cuts), so each process
# decodes each recording once, not once per cut. One entry: one recording's samples held.
_LAST_DECODED: dict = {}


def _decoded_whole(path: str) -> tuple[np.ndarray, int]:
    try:
        st = os.stat(path)
    except OSError:
        return read_audio(path)  # its message names the problem
    key = (path, st.st_size, st.st_mtime_ns)
    if _LAST_DECODED.get("key") != key:
        _LAST_DECODED.clear()  # the previous recording is freed before the next is decoded
        _LAST_DECODED.update(key=key, audio=read_audio(path))
    return _LAST_DECODED["audio"]


@dataclass(frozen=True)
class AudioSlice:
    """``duration`` seconds of an audio file from ``offset`` (a Lhotse cut of a longer
    recording); ``duration=None`` runs to the end. Cut at whole samples:
    ``round(offset * rate)`` and ``round(duration * rate)`` samples, as Lhotse counts them."""

    path: str
    offset: float
    duration: float | None

    def read(self) -> tuple[np.ndarray, int]:
        name = Path(self.path).name
        if not self.offset >= 0:
            raise InputError(f"audio {name}: the slice starts at {self.offset:.3f} s, before the start "
                             "of the audio")
        if self.duration is not None and not self.duration > 0:
            raise InputError(f"audio {name}: the slice lasts {self.duration:.3f} s")
        wav, rate = _decoded_whole(self.path)
        total = wav.shape[1]
        start = round(self.offset * rate)
        stop = total if self.duration is None else start + round(self.duration * rate)
        if start >= total:
            raise InputError(f"audio {Path(self.path).name}: the slice starts at {self.offset:.3f} s, "
                             f"after the end of the audio ({total / rate:.3f} s)")
        if stop > total + round(SLICE_END_TOLERANCE_S * rate):
            raise InputError(f"audio {Path(self.path).name}: the slice ends at {stop / rate:.3f} s, "
                             f"after the end of the audio ({total / rate:.3f} s)")
        if stop <= start:
            raise InputError(f"audio {name}: the slice of {self.duration:.6f} s from {self.offset:.3f} s "
                             "holds no whole sample")
        return wav[:, start:min(stop, total)].copy(), rate

    def __str__(self) -> str:
        end = "end" if self.duration is None else f"{self.offset + self.duration:.3f} s"
        return f"{self.path} [{self.offset:.3f} s - {end}]"


def load_audio(source) -> tuple[np.ndarray, int]:
    """The audio of a :class:`Recording`: a file path, or any reference with a ``read()`` method
    returning ``(wav, rate)`` (an :class:`AudioSlice`, a Hugging Face dataset row)."""
    return read_audio(source) if isinstance(source, (str, Path)) else source.read()


# A RIFF data chunk of this size (or 0) is a stream whose writer never knew its length.
_UNKNOWN_WAV_SIZES = (0, 0xFFFFFFFF)


def check_sample_rate(rate: int, name: str) -> None:
    """:class:`InputError` unless ``MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE``."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        side = f"below {MIN_SAMPLE_RATE}" if rate < MIN_SAMPLE_RATE else f"above {MAX_SAMPLE_RATE}"
        raise InputError(f"audio {name}: sample rate {rate} Hz is {side} Hz (audio is read at "
                         f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)")


def check_wav_header(path: str | Path, name: str | None = None) -> None:
    """:class:`InputError` when a RIFF/WAVE file's ``fmt`` chunk declares a sample rate outside
    :func:`check_sample_rate`'s range (checked before decoding: sphn panics on 0 Hz), or the file
    holds fewer sample bytes than its ``data`` chunk header declares (a cut-off download or copy:
    decoders return what is there, silently).

    Other formats, and WAVs whose writer left the data size unknown (0 or 0xFFFFFFFF), pass the
    length check.
    """
    path = Path(path)
    name = name or path.name
    try:
        _walk_wav_chunks(path, name)
    except OSError as err:
        raise InputError(f"cannot read audio {name}: {err.strerror or err}") from None


def _walk_wav_chunks(path: Path, name: str) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        pos, rate, block = 12, 0, 0
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            cid, csize = chunk[:4], int.from_bytes(chunk[4:8], "little")
            if cid == b"fmt ":
                fmt = f.read(16)
                if len(fmt) == 16:
                    rate = int.from_bytes(fmt[4:8], "little")
                    block = int.from_bytes(fmt[12:14], "little")
                    check_sample_rate(rate, name)
            elif cid == b"data":
                if csize in _UNKNOWN_WAV_SIZES:
                    return
                have = size - pos - 8
                if have < csize:
                    def secs(n: int) -> str:  # called at once, below: block and rate are current
                        return f"{n / block / rate:.3f} s" if rate and block else "?"  # noqa: B023
                    raise InputError(f"audio {name} is truncated: its header says {secs(csize)} "
                                     f"({csize} bytes of samples), the file holds {secs(have)} ({have} bytes)")
                return
            pos += 8 + csize + (csize & 1)  # chunks are padded to an even size


def load_codes(path: str | Path, num_codebooks: int, codebook_size: int) -> np.ndarray:
    """Pre-encoded codes ``[K', T]`` from ``.npy`` -> int64 ``[num_codebooks, T]``, checked."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"codes file not found: {path}")
    try:
        codes = np.load(path, allow_pickle=False)
    except Exception as err:
        raise InputError(f"cannot read codes {path.name} as a .npy array: {err}") from None
    if codes.ndim != 2:
        raise InputError(f"codes {path.name} must be [num_codebooks, frames], got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise InputError(f"codes {path.name} must be integers, got dtype {codes.dtype}")
    if codes.shape[0] < num_codebooks:
        raise InputError(f"codes {path.name} have {codes.shape[0]} codebooks; the layout needs "
                         f"{num_codebooks} (vocab.num_codebooks)")
    if codes.shape[1] == 0:
        raise InputError(f"codes {path.name} are empty (0 frames)")
    codes = codes[:num_codebooks].astype(np.int64)
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= codebook_size:
        raise InputError(f"codes {path.name} hold values in [{low}, {high}], outside "
                         f"[0, {codebook_size}) (vocab.codebook_size)")
    return codes


# ----------------------------------------------------------------- text corpora
@dataclass(frozen=True)
class TextRange:
    """A byte range of a text corpus holding whole documents: one work unit's input."""

    path: str
    fmt: str  # "jsonl" | "paragraph" | "line"
    start: int
    end: int
    first_line: int
    num_docs: int


@dataclass(frozen=True)
class TextDoc:
    record_id: str
    text: str


def text_format(path: str | Path, split: str) -> str:
    """``jsonl`` for .jsonl/.json files, else the plain-text split mode (paragraph | line)."""
    return "jsonl" if Path(path).suffix.lower() in JSONL_SUFFIXES else split


def _raw_docs(f, fmt: str, start: int, end: float, first_line: int
              ) -> Iterator[tuple[int, int, int, bytes]]:
    """Documents of a byte range: (first line number, byte offset and line number right after
    the document, raw bytes). A paragraph ends at the blank line that follows it."""
    f.seek(start)
    pos, line_no = start, first_line
    para: list[bytes] = []
    para_line = line_no
    while pos < end:
        line = f.readline()
        if not line:
            break
        pos += len(line)
        line_no += 1
        blank = not line.strip()
        if fmt == "paragraph":
            if not blank:
                if not para:
                    para_line = line_no - 1
                para.append(line)
            elif para:
                yield para_line, pos, line_no, b"".join(para)
                para = []
        elif not blank:
            yield line_no - 1, pos, line_no, line
    if para:
        yield para_line, pos, line_no, b"".join(para)


def plan_text(path: str | Path, fmt: str, docs_per_unit: int) -> list[TextRange]:
    """Cut a corpus into ranges of ``docs_per_unit`` documents (one pass, constant memory)."""
    path = str(path)
    ranges: list[TextRange] = []
    unit_start, unit_line, count = 0, 1, 0
    with open(path, "rb") as f:
        for _, pos, next_line, _ in _raw_docs(f, fmt, 0, math.inf, 1):
            count += 1
            if count == docs_per_unit:
                ranges.append(TextRange(path, fmt, unit_start, pos, unit_line, count))
                unit_start, unit_line, count = pos, next_line, 0
        if count:
            ranges.append(TextRange(path, fmt, unit_start, pos, unit_line, count))
    return ranges


def read_text_range(r: TextRange) -> Iterator[TextDoc | Skipped]:
    """The documents of one range; bad ones (non-UTF-8, bad JSON, no text) as :class:`Skipped`."""
    name = Path(r.path).name
    with open(r.path, "rb") as f:
        for line_no, _, _, raw in _raw_docs(f, r.fmt, r.start, r.end, r.first_line):
            where = f"{name}:{line_no}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield Skipped(where, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})")
                continue
            rid = where
            if r.fmt == "jsonl":
                try:
                    obj = _json_line(text)
                    if not isinstance(obj, dict):
                        raise InputError("a line must be a JSON object with a 'text' field")
                    text = _text(obj.get("text"), "'text'")
                    if "id" in obj:
                        rid = str(obj["id"])
                except InputError as err:
                    yield Skipped(where, str(err))
                    continue
            else:
                text = text.strip()
                if r.fmt == "paragraph":
                    text = "\n".join(line.strip() for line in text.splitlines())
            yield TextDoc(rid, text)
