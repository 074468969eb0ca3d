"""The reader contract of a built split: everything opening one checks before any shard is read.

A dataset is data from elsewhere (a colleague's bucket, a download, a shared file system), and
mosaicml-streaming trusts its ``index.json``: it unpickles ``pkl`` columns, joins shard
``basename``s to folders as given (``../../x`` and absolute paths included) and inflates a
compressed shard to whatever size it holds. So no shard entry reaches streaming (or the node
cache) before it passes this module:

* ``index.json``: ``{"shards": [...], "version": 2}``; each shard entry has exactly the keys
  streaming's ``MDSWriter`` writes, ``format == "mds"``, ``version == 2``, and exactly the
  columns and encodings of :data:`.schema.MDS_COLUMNS` (no ``pkl``, no ``json``, nothing
  else); ``samples``, sizes and hashes of the right types and ranges; ``compression`` one of
  :data:`COMPRESSIONS` with a ``zip_data`` entry, or null without one;
* shard file names: relative, made of plain path components (no ``..``, ``.``, empty or
  hidden ones), ending in the writer's ``shard.<n>.mds`` (``.<ext>`` for the archive), unique,
  and resolving inside the split folder and the cache folder (:func:`inside`);
* ``soda_meta.json``: every field the builder writes, of its type and range (:func:`check_meta`);
* ``doc_lengths.npy``: a 1-D integer array of lengths in ``0..MAX_DOC_TOKENS``, one per sample
  (:func:`check_lengths_chunk`, run in the one pass that sums tokens per shard);
* sizes: a shard's ``raw_data.bytes`` lies between what its documents take in the MDS layout
  and that plus :data:`MAX_STRING_BYTES` per document (:func:`check_shard_bytes`); files on
  disk or fetched have the sizes the index gives; a compressed shard is inflated by
  :func:`inflate` a chunk at a time, only up to ``raw_data.bytes``, and refused the moment it
  goes past;
* budget (:func:`check_budget`): what the split puts in the node cache, and how far a
  compressed shard inflates beyond its archive.

Anything else is a :class:`DatasetError` (exit 2, one line) naming the split, the shard and the
field. Local splits, ``s3://`` (and the other remote schemes) and ``data build --finalize``
(which writes ``index.json`` from the unit markers of every part) use the same checks.
"""

from __future__ import annotations

import bz2
import io
import math
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from soda_mega.data.schema import FORMAT, LENGTHS_FILE, MDS_COLUMNS, META_KEYS, SPLITS
from soda_mega.errors import SodaUserError
from soda_mega.utils.files import not_regular

INDEX_FILE = "index.json"

# The keys of one shard entry, as MDSWriter writes them (streaming passes them to its reader's
# constructor: an unknown key would be a TypeError there).
SHARD_KEYS = frozenset({"column_encodings", "column_names", "column_sizes", "compression", "format",
                        "hashes", "raw_data", "samples", "size_limit", "version", "zip_data"})
FILE_KEYS = frozenset({"basename", "bytes", "hashes"})
COLUMN_NAMES = sorted(MDS_COLUMNS)  # MDSWriter stores its columns sorted by name
COLUMN_ENCODINGS = [MDS_COLUMNS[c] for c in COLUMN_NAMES]
COLUMN_SIZES = [None] * len(COLUMN_NAMES)  # every soda-mega column has a variable size
# Compression families whose inflation is bounded here (:func:`inflate`). streaming also
# writes br and snappy; soda-mega refuses them (its own builds never compress shards).
COMPRESSIONS = ("zstd", "gz", "bz2")
# streaming.base.hashing's algorithms (check_hashes would fail on any other name).
KNOWN_HASHES = ("blake2b", "blake2s", "md5", "sha1", "sha224", "sha256", "sha384", "sha512",
                "sha3_224", "sha3_256", "sha3_384", "sha3_512", "xxh32", "xxh64", "xxh128", "xxh3_64",
                "xxh3_128")
# MDS offsets are uint32: a shard holds < 4 GiB, so a document (4 bytes a token) < 2^30 tokens.
MAX_DOC_TOKENS = (1 << 30) - 1
MAX_SAMPLES = (1 << 30) - 1
MAX_SHARD_BYTES = 1 << 32
# Per document, the two string columns (doc_type, record_id) may take this many bytes at most.
MAX_STRING_BYTES = 8192
# index.json and soda_meta.json are read whole: a few MB even for 500B tokens (an index entry
# is ~400 bytes per shard of up to 4 GiB). Anything far larger is not one of them.
MAX_JSON_BYTES = 256 << 20
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,254}")
_SHARD_FILE = re.compile(r"shard\.[0-9]{1,12}\.mds")
_HEX = re.compile(r"[0-9a-f]{1,128}")
_CHUNK = 1 << 20
_RATIO_SLACK = 1 << 16


class DatasetError(SodaUserError, ValueError):
    """A user-facing data error: a dataset, shard or document is missing, malformed, damaged,
    or does not fit the model. The message names it; the CLI prints it and exits with 2."""


class MissingSplitError(DatasetError):
    """The dataset has no such split (e.g. no ``valid/``): validation can be switched off."""


def check_regular(path: Path, shown: str) -> Path:
    """``path`` (named ``shown``), refused unopened when it exists but is not a regular file."""
    problem = not_regular(path)
    if problem:
        raise DatasetError(f"{shown}: {problem}; refused: a dataset holds only regular files (a "
                           "FIFO would block the reader forever, a device never ends)")
    return Path(path)


class EmptySplitError(MissingSplitError):
    """The split is there but holds no documents (a small build's valid split): treated as a
    missing split, so validation of that dataset is skipped."""


def read_capped(path: Path, shown: str, limit: int | None = None) -> bytes:
    """The bytes of the metadata file ``path`` (named ``shown``), refused unread when it holds
    more than ``limit`` (default :data:`MAX_JSON_BYTES`) bytes or is not a regular file."""
    limit = MAX_JSON_BYTES if limit is None else limit
    check_regular(path, shown)
    size = Path(path).stat().st_size
    if size <= limit:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # a file that grows after the stat is still cut at the limit
        size = len(data)
    if size > limit:
        raise DatasetError(f"{shown}: {size:,} bytes, more than any {Path(path).name} of a "
                           f"soda-mega dataset ({limit:,} at most)")
    return data


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any, lo: int, hi: int, fail: Callable[[str], DatasetError], field: str) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise fail(f"{field}: expected an integer in {lo}..{hi}, got {_show(value)}")
    return value


# ----------------------------------------------------------------------------- index.json
def check_index(index: Any, where: str) -> list[dict]:
    """The shard entries of a parsed ``index.json`` of the split at ``where``, all checked."""
    shown = f"{where}/{INDEX_FILE}"
    if not isinstance(index, dict):
        raise DatasetError(f"{shown}: expected a JSON object, got {type(index).__name__}")
    if set(index) != {"shards", "version"} or index.get("version") != 2 or not _is_int(index["version"]):
        raise DatasetError(f"{shown}: expected exactly the keys shards and version (2) an MDS index "
                           f"has, got {_show(sorted(index))} with version {_show(index.get('version'))}")
    shards = index["shards"]
    if not isinstance(shards, list):
        raise DatasetError(f"{shown}: shards: expected a list of shard entries, got {_show(shards)}")
    seen: dict[str, int] = {}
    for i, shard in enumerate(shards):
        check_shard(shard, i, shown)
        for key in ("raw_data", "zip_data"):
            if shard[key] is None:
                continue
            name = shard[key]["basename"]
            if name in seen:
                raise DatasetError(f"{shown}: shard {i} ({name}): {key}.basename: also the file of "
                                   f"shard {seen[name]} (every shard has its own files)")
            seen[name] = i
    return shards


def check_shard(shard: Any, i: int, shown: str) -> None:
    """One shard entry: exactly what MDSWriter writes for soda-mega's columns."""
    if not isinstance(shard, dict):
        raise DatasetError(f"{shown}: shard {i}: expected a JSON object, got {_show(shard)}")
    raw = shard.get("raw_data")
    label = f"shard {i}"
    if isinstance(raw, dict) and isinstance(raw.get("basename"), str):
        name = raw["basename"][:120]
        label += f" ({name if name.isprintable() else _show(name)})"  # one line, whatever it holds

    def fail(message: str) -> DatasetError:
        return DatasetError(f"{shown}: {label}: {message}")

    missing, extra = sorted(SHARD_KEYS - set(shard)), sorted(set(shard) - SHARD_KEYS)
    if missing or extra:
        raise fail("expected the keys of an MDS shard entry"
                   + (f"; missing {', '.join(missing)}" if missing else "")
                   + (f"; unknown {', '.join(extra[:5])}" if extra else ""))
    if shard["format"] != "mds":
        raise fail(f"format: expected 'mds', got {_show(shard['format'])}")
    if shard["version"] != 2 or not _is_int(shard["version"]):
        raise fail(f"version: expected 2, got {_show(shard['version'])}")
    names, encodings = shard["column_names"], shard["column_encodings"]
    if names != COLUMN_NAMES:
        odd = ""
        if isinstance(names, list) and isinstance(encodings, list):
            odd = ", ".join(f"{n}: {e}" for n, e in zip(names, encodings) if n not in MDS_COLUMNS)
        raise fail(f"column_names: expected exactly {COLUMN_NAMES} (the columns soda-mega writes), "
                   f"got {_show(names)}" + (f" (unknown columns {odd[:120]})" if odd else ""))
    if shard["column_encodings"] != COLUMN_ENCODINGS:
        got = shard["column_encodings"]
        odd = [f"{n}: {e}" for n, e in zip(COLUMN_NAMES, got if isinstance(got, list) else [])
               if MDS_COLUMNS[n] != e]
        raise fail(f"column_encodings: expected {COLUMN_ENCODINGS} (no pkl, json or other encodings "
                   f"are read), got {_show(got)}" + (f" ({', '.join(odd)})" if odd else ""))
    if shard["column_sizes"] != COLUMN_SIZES:
        raise fail(f"column_sizes: expected {COLUMN_SIZES}, got {_show(shard['column_sizes'])}")
    _int(shard["samples"], 0, MAX_SAMPLES, fail, "samples")
    if shard["size_limit"] is not None:
        _int(shard["size_limit"], 0, MAX_SHARD_BYTES, fail, "size_limit")
    algos = shard["hashes"]
    if not isinstance(algos, list) or any(a not in KNOWN_HASHES for a in algos) or \
            len(set(algos)) != len(algos):
        raise fail(f"hashes: expected a list of distinct hash names ({', '.join(KNOWN_HASHES)}), "
                   f"got {_show(algos)}")
    check_file(raw, "raw_data", fail, None)
    compression, zip_data = shard["compression"], shard["zip_data"]
    if compression is None:
        if zip_data is not None:
            raise fail(f"zip_data: expected null for a shard without compression, got {_show(zip_data)}")
        return
    family = compression.split(":")[0] if isinstance(compression, str) else None
    if family not in COMPRESSIONS or not _level_ok(compression):
        raise fail(f"compression: expected null or one of {', '.join(COMPRESSIONS)} (with an "
                   f"optional :level), got {_show(compression)}")
    if zip_data is None:
        raise fail(f"zip_data: missing although compression is {compression!r}")
    check_file(zip_data, "zip_data", fail, f"{raw['basename']}.{family}")
    # No compressor expands data by more than a small fraction (plus frame headers).
    if zip_data["bytes"] > raw["bytes"] + raw["bytes"] // 64 + (1 << 16):
        raise fail(f"zip_data.bytes: {zip_data['bytes']} is far more than raw_data.bytes "
                   f"{raw['bytes']} (not a compressed copy of it)")


def _level_ok(compression: str) -> bool:
    """A level streaming knows for the family (``zstd:7``; ``zstd:99`` is no compression)."""
    from soda_mega.data.streaming_compat import streaming_module

    return streaming_module("compression").is_compression(compression)


def check_file(info: Any, key: str, fail: Callable[[str], DatasetError], archive_of: str | None) -> None:
    """``raw_data`` / ``zip_data``: basename, bytes and hashes (``archive_of``: the name the
    compressed file must have, the raw name plus the compression's extension)."""
    if not isinstance(info, dict) or set(info) != FILE_KEYS:
        raise fail(f"{key}: expected an object with exactly {', '.join(sorted(FILE_KEYS))}, got "
                   f"{_show(info)}")
    check_basename(info["basename"], f"{key}.basename", fail, archive_of)
    _int(info["bytes"], 0, MAX_SHARD_BYTES, fail, f"{key}.bytes")
    hashes = info["hashes"]
    if not isinstance(hashes, dict) or any(
            a not in KNOWN_HASHES or not isinstance(h, str) or not _HEX.fullmatch(h)
            for a, h in hashes.items()):
        raise fail(f"{key}.hashes: expected an object of hash name -> hex digest "
                   f"({', '.join(KNOWN_HASHES)}), got {_show(hashes)}")


def check_basename(name: Any, field: str, fail: Callable[[str], DatasetError],
                   archive_of: str | None = None) -> str:
    """A shard file name: relative, plain components, the writer's ``shard.<n>.mds`` last."""
    if not isinstance(name, str):
        raise fail(f"{field}: expected a relative file name, got {_show(name)}")
    parts = name.split("/")
    if name.startswith("/") or any(not _COMPONENT.fullmatch(p) for p in parts):
        raise fail(f"{field}: {_show(name)} is not a plain relative path inside the split folder "
                   "(no absolute paths, '..', '.', empty or hidden components, no odd characters)")
    expected = archive_of if archive_of is not None else None
    if expected is not None and name != expected:
        raise fail(f"{field}: expected {expected!r} (the raw shard's name and the compression's "
                   f"extension), got {_show(name)}")
    if archive_of is None and not _SHARD_FILE.fullmatch(parts[-1]):
        raise fail(f"{field}: {_show(name)} is not a shard file name (shard.<n>.mds, as MDSWriter "
                   "names them)")
    return name


def inside(base: Path, name: str, what: str) -> Path:
    """``base / name``, refused when it resolves (through symlinks) outside ``base``."""
    path = Path(base) / name
    try:
        path.resolve().relative_to(Path(base).resolve())
    except ValueError:
        raise DatasetError(f"{what}: {path} resolves outside {base} (a symlink?); shard files must "
                           "lie inside the split and cache folders") from None
    return path


def check_shard_bytes(shards: list[dict], tokens: np.ndarray, where: str) -> None:
    """Each shard's ``raw_data.bytes`` against what its documents take in MDS: a 4-byte count,
    4-byte offsets, 4 size fields, 4 bytes a token, 1 a mask entry, and the two strings."""
    for i, (shard, total) in enumerate(zip(shards, tokens.tolist())):
        n = shard["samples"]
        least = 4 + 4 * (n + 1) + 16 * n + 5 * int(total)
        most = least + MAX_STRING_BYTES * n
        got = shard["raw_data"]["bytes"]
        if not least <= got <= most:
            raise DatasetError(
                f"{where}/{INDEX_FILE}: shard {i} ({shard['raw_data']['basename']}): raw_data.bytes "
                f"{got} does not fit its {n} documents of {total} tokens ({LENGTHS_FILE}), which "
                f"take {least}..{most} bytes")


def check_budget(shards: list[dict], where: str, max_bytes: int | None, max_ratio: float | None,
                 cached: bool) -> None:
    """The split's shards against its budget (None: no limit), before any is fetched or inflated:
    what they put in the node cache (``raw_data.bytes`` of every compressed shard, and of every
    shard when ``cached``: a remote split) at most ``max_bytes`` in all (data.max_dataset_bytes),
    and no compressed shard more than ``max_ratio`` times its archive (data.max_inflate_ratio):
    token shards compress a few times; a few KB that declare a GB are a decompression bomb."""
    shown = f"{where}/{INDEX_FILE}"
    if max_ratio is not None:
        for i, shard in enumerate(shards):
            raw, packed = shard["raw_data"]["bytes"], (shard["zip_data"] or {}).get("bytes")
            # NOTE: the slack lets a tiny shard (a header and a few documents) compress any amount.
            if packed is not None and raw > max_ratio * packed + _RATIO_SLACK:
                raise DatasetError(
                    f"{shown}: shard {i} ({shard['raw_data']['basename']}): raw_data.bytes {raw:,} is "
                    f"{raw / max(packed, 1):,.0f} times zip_data.bytes {packed:,}, more than "
                    f"data.max_inflate_ratio={max_ratio:g} (a decompression bomb? raise the limit "
                    "only for data you trust)")
    if max_bytes is not None:
        total = sum(s["raw_data"]["bytes"] for s in shards if cached or s["compression"])
        if total > max_bytes:
            raise DatasetError(
                f"{shown}: raw_data.bytes: the shards inflate to {total:,} bytes in all, more than "
                f"data.max_dataset_bytes={max_bytes:,} (the node-cache space one dataset may take; "
                "raise it for a dataset this large)")


# ----------------------------------------------------------------------------- doc_lengths.npy
def check_lengths_header(dtype: np.dtype, shape: tuple, shown: str) -> None:
    if len(shape) != 1 or dtype.kind not in "iu":
        raise DatasetError(f"{shown}: expected a 1-D integer array, got {dtype} with shape {shape}")


def check_lengths_chunk(part: np.ndarray, start: int, shown: str) -> None:
    """Lengths ``start..`` of ``doc_lengths.npy``: each in 0..MAX_DOC_TOKENS."""
    if not len(part):
        return
    lo, hi = int(part.min()), int(part.max())
    if lo < 0 or hi > MAX_DOC_TOKENS:
        bad = int(np.nonzero((part < 0) | (part > MAX_DOC_TOKENS))[0][0])
        raise DatasetError(f"{shown}: document {start + bad} has length {int(part[bad])}, outside "
                           f"0..{MAX_DOC_TOKENS}")


# ----------------------------------------------------------------------------- soda_meta.json
_LAYOUT_INTS = ("text_vocab_size", "num_codebooks", "codebook_size", "bos_id", "eos_id")
_KINDS = ("speech", "text", "s2st")


def check_meta(meta: Any, shown: str) -> dict:
    """``soda_meta.json``: every field the builder writes, typed and in range; ``shown`` names the
    file. Unknown extra keys are ignored (nothing reads them)."""
    def fail(message: str) -> DatasetError:
        return DatasetError(f"{shown}: {message}")

    if not isinstance(meta, dict):
        raise fail("expected a JSON object")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise fail(f"missing keys {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise fail(f"format {_show(meta['format'])}, this soda-mega reads {FORMAT!r}")
    if meta["split"] not in SPLITS:
        raise fail(f"split: expected one of {', '.join(SPLITS)}, got {_show(meta['split'])}")
    if meta["kind"] not in _KINDS:
        raise fail(f"kind: expected one of {', '.join(_KINDS)}, got {_show(meta['kind'])}")
    _check_layout(meta["vocab_layout"], fail)
    if not isinstance(meta["vocab_fingerprint"], str):
        raise fail(f"vocab_fingerprint: expected a string, got {_show(meta['vocab_fingerprint'])}")
    _check_codec(meta["codec"], fail)
    tok = meta["tokenizer"]
    if not isinstance(tok, dict) or not isinstance(tok.get("kind"), str) or any(
            not isinstance(tok.get(k), (str, type(None))) for k in ("path", "sha256")):
        raise fail(f"tokenizer: expected {{kind: string, path: string or null, sha256: string or "
                   f"null}}, got {_show(tok)}")
    _int(meta["num_docs"], 0, 1 << 62, fail, "num_docs")
    if "num_records" in meta:
        _int(meta["num_records"], 0, 1 << 62, fail, "num_records")
    for key in ("doc_types", "tokens"):
        counts = meta[key]
        if not isinstance(counts, dict) or any(not _is_int(v) or v < 0 for v in counts.values()):
            raise fail(f"{key}: expected an object of name -> count >= 0, got {_show(counts)}")
    hours = meta["audio_hours"]
    if not isinstance(hours, (int, float)) or isinstance(hours, bool) or not math.isfinite(hours) or hours < 0:
        raise fail(f"audio_hours: expected a finite number >= 0, got {_show(hours)}")
    skipped = meta["skipped"]
    if not isinstance(skipped, list) or any(
            not isinstance(s, dict) or not isinstance(s.get("record"), str)
            or not isinstance(s.get("reason"), str) for s in skipped):
        raise fail(f"skipped: expected a list of {{record, reason}} strings, got {_show(skipped)}")
    if "build" in meta and not isinstance(meta["build"], dict):
        raise fail(f"build: expected an object, got {_show(meta['build'])}")
    return meta


def _check_layout(layout: Any, fail: Callable[[str], DatasetError]) -> None:
    from soda_mega.tokens.layout import VocabLayout

    keys = set(_LAYOUT_INTS) | {"special_tokens"}
    if not isinstance(layout, dict) or set(layout) != keys:
        raise fail(f"vocab_layout: expected an object with exactly {', '.join(sorted(keys))}, got "
                   f"{_show(layout)}")
    for key in _LAYOUT_INTS:
        _int(layout[key], 0, (1 << 31) - 1, fail, f"vocab_layout.{key}")
    specials = layout["special_tokens"]
    if not isinstance(specials, list) or len(specials) > 1024 or any(
            not isinstance(s, str) or len(s) > 256 for s in specials):
        raise fail(f"vocab_layout.special_tokens: expected a list of names, got {_show(specials)}")
    try:
        VocabLayout.from_dict(layout)
    except (SodaUserError, TypeError, ValueError) as err:
        raise fail(f"vocab_layout: {err}") from None


def _check_codec(codec: Any, fail: Callable[[str], DatasetError]) -> None:
    if codec is None:
        return
    if not isinstance(codec, dict) or not isinstance(codec.get("name"), str):
        raise fail(f"codec: expected null or an object with a name, got {_show(codec)}")
    for key, lo in (("sample_rate", 1), ("num_codebooks", 1), ("codebook_size", 2)):
        _int(codec.get(key), lo, (1 << 31) - 1, fail, f"codec.{key}")
    rate = codec.get("frame_rate")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not math.isfinite(rate) or rate <= 0:
        raise fail(f"codec.frame_rate: expected a number > 0, got {_show(rate)}")
    for key in ("weights", "weights_sha256"):
        if not isinstance(codec.get(key), (str, type(None))):
            raise fail(f"codec.{key}: expected a string or null, got {_show(codec.get(key))}")
    if not isinstance(codec.get("random_init"), bool):
        raise fail(f"codec.random_init: expected true or false, got {_show(codec.get('random_init'))}")
    if "seed" in codec:
        _int(codec["seed"], 0, (1 << 63) - 1, fail, "codec.seed")


# ----------------------------------------------------------------------------- bounded inflation
class InflateError(OSError):
    """A compressed shard that is damaged or does not inflate to its declared size."""


def inflate(compression: str, src: BinaryIO | bytes, out: BinaryIO, size: int) -> None:
    """Decompress the archive ``src`` (a binary file, or bytes) into ``out``; exactly ``size``
    bytes or :class:`InflateError`, and never more than ``size`` (plus one chunk) inflated: a
    bomb stops at its first excess chunk. Memory stays at a few chunks, whatever the archive
    declares: the archive is read and its output written a chunk (1 MiB) at a time.

    zstd goes through libzstd's streaming decoder (:mod:`.zstd_stream`); without libzstd, frames
    are inflated one at a time, each only after its header declared its content size and the
    declared sizes sum to ``size`` (memory: the largest frame). gz and bz2 are streamed."""
    family = compression.split(":")[0]
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(src)
    written = 0

    def write(chunk) -> None:
        nonlocal written
        written += len(chunk)
        if written > size:
            raise InflateError(f"inflates to more than raw_data.bytes ({size}); stopped there")
        out.write(chunk)

    try:
        if family == "zstd":
            _inflate_zstd(src, write, size)
        elif family == "gz":
            _inflate_stream(src, write, lambda: zlib.decompressobj(wbits=31))
        elif family == "bz2":
            _inflate_stream(src, write, bz2.BZ2Decompressor)
        else:
            raise InflateError(f"compression {compression!r} is not read by soda-mega")
    except InflateError:
        raise
    except EOFError:
        raise InflateError("the archive is truncated") from None
    except Exception as err:  # zstd / zlib / bz2 errors of a damaged archive
        raise InflateError(f"cannot decompress ({type(err).__name__}: {err})") from err
    if written != size:
        raise InflateError(f"inflates to {written} bytes, raw_data.bytes says {size}")


def _inflate_stream(src: BinaryIO, write: Callable[[bytes], None], new: Callable[[], Any]) -> None:
    """gz / bz2 members, one after another, read and written a chunk at a time."""
    dec, data, started = new(), b"", False
    while True:
        if not data:
            data = src.read(_CHUNK)
        if not data:
            if not started:
                return
            # The archive is read: only output the decoder still holds may come.
            chunk = dec.decompress(b"", _CHUNK)
            if not chunk:
                raise InflateError("the archive is truncated")
            write(chunk)
            continue
        started = True
        write(dec.decompress(data, _CHUNK))
        data = getattr(dec, "unconsumed_tail", b"")  # zlib keeps the rest; bz2 buffers it
        while not data and not dec.eof and not getattr(dec, "needs_input", True):
            write(dec.decompress(b"", _CHUNK))
        if dec.eof:  # the next member starts with what this one left
            data = dec.unused_data + data
            dec, started = new(), False


_ZSTD_MAGIC = 0xFD2FB528


def _zstd_frames(data: bytes) -> list[tuple[int, int, int]]:
    """(start, end, declared content size) of each zstd frame, from the headers and block
    headers alone (RFC 8878 section 3.1.1)."""
    frames, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 6 or int.from_bytes(data[pos:pos + 4], "little") != _ZSTD_MAGIC:
            raise InflateError(f"no zstd frame at byte {pos}")
        fhd = data[pos + 4]
        fcs_flag, single, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
        if fhd & 0x08:
            raise InflateError(f"zstd frame at byte {pos}: reserved header bit set")
        fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
        if not fcs_len:
            raise InflateError(f"zstd frame at byte {pos} does not declare its content size "
                               "(MDSWriter's frames do)")
        at = pos + 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
        if at + fcs_len > len(data):
            raise InflateError("the archive is truncated")
        declared = int.from_bytes(data[at:at + fcs_len], "little") + (256 if fcs_len == 2 else 0)
        at += fcs_len
        while True:
            if at + 3 > len(data):
                raise InflateError("the archive is truncated")
            header = int.from_bytes(data[at:at + 3], "little")
            last, kind, block = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise InflateError(f"zstd block at byte {at}: reserved block type")
            at += 3 + (1 if kind == 1 else block)
            if last:
                break
        at += 4 if checksum else 0
        if at > len(data):
            raise InflateError("the archive is truncated")
        frames.append((pos, at, declared))
        pos = at
    return frames


def _inflate_zstd(src: BinaryIO, write: Callable[[bytes], None], size: int) -> None:
    from soda_mega.data import zstd_stream

    if zstd_stream.available():
        zstd_stream.decompress_stream(src, write, _CHUNK)
        return
    import zstd

    data = src.read()
    frames = _zstd_frames(data)
    declared = sum(f[2] for f in frames)
    if declared != size:
        raise InflateError(f"its zstd frames declare {declared} bytes, raw_data.bytes says {size}")
    for start, end, _ in frames:
        write(zstd.decompress(data[start:end]))
