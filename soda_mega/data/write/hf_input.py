"""Local Hugging Face datasets as a recording source of ``data build --hf-dataset PATH``.

``PATH`` is a dataset on this machine, read through the ``datasets`` library (optional:
``pip install datasets``): a ``save_to_disk`` folder (a ``Dataset``, or a ``DatasetDict`` whose
split ``--split`` picks, ``train`` by default), a ``.parquet`` or ``.arrow`` file, or a folder of
data files in a layout ``datasets.load_dataset(PATH)`` understands (a hub snapshot downloaded
beforehand: ``data/train-00000-of-00004.parquet``, ...), or the name of a hub dataset whose
snapshot is in the hub cache (``hf download --repo-type dataset NAME`` left it there: its
``main`` revision is read). Nothing is ever downloaded: a name without a local copy is refused
with :class:`SourceError`, and the libraries are loaded with ``HF_DATASETS_OFFLINE=1`` /
``HF_HUB_OFFLINE=1``. Parquet inputs are converted once into the library's cache
(``HF_DATASETS_CACHE``), as ``load_dataset`` does.

Each row is one recording: ``--audio-column`` (default ``audio``) holds the audio (an ``Audio``
feature ``{"bytes", "path"}``, encoded bytes, or a file path), ``--text-column`` (default
``text``) the transcript of the whole recording and ``--id-column`` the record id (default: the
``id`` column when the dataset has one, else ``<dataset>/<row>``). The train/valid split goes by
``--recording-column`` (rows cut from one recording share its value; default: each row is its
own recording) and, with ``data.split_by=speaker``, ``--speaker-column``. The same row as a JSONL
manifest line ``{"id": ID, "audio": FILE, "transcript": TEXT}`` gives the same documents.

Planning reads only the text and id columns. A :class:`Recording` carries an :class:`HFRow`
(dataset + row index, a few bytes) as its audio; the worker (or feeder) that encodes it opens
the dataset once per process (Arrow tables are memory-mapped), reads that row's audio column
with ``Audio(decode=False)`` and decodes the bytes with the project's reader
(:func:`~soda_mega.data.write.inputs.read_audio_bytes`, sphn), not with the library's own decoder
(torchcodec), so a row decodes to the same samples as the same file on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from soda_mega.data.write.inputs import (
    InputError,
    Recording,
    Segment,
    Skipped,
    SourceError,
    _text,
    read_audio,
    read_audio_bytes,
)

PLAN_BATCH_ROWS = 4096
# Files up to this size are hashed whole; larger ones by a fixed sample of blocks (below).
FULL_HASH_BYTES = 4 << 20
SAMPLE_BLOCK = 1 << 20
SAMPLE_BLOCKS = 16


def import_datasets():
    """The ``datasets`` module, loaded offline; :class:`SourceError` naming the package if missing."""
    try:
        with offline():
            import datasets
    except ImportError:
        raise SourceError("--hf-dataset needs the Hugging Face `datasets` package: pip install datasets") from None
    return datasets


@contextlib.contextmanager
def offline():
    """``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` while inside (environment, and the
    libraries' flags when they are imported already): nothing reaches the network."""
    import sys

    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    flags = []
    for module, names in (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                          ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        mod = sys.modules.get(module)
        for name in names if mod is not None else ():
            if hasattr(mod, name):
                flags.append((mod, name, getattr(mod, name)))
                setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in flags:
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# A hub repository id: NAME or OWNER/NAME.
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def hub_cache_dir() -> str:
    """The hub cache ``huggingface_hub`` uses (``HF_HUB_CACHE``, ``HF_HOME``/hub, ...)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_HUB_CACHE", "~/.cache/huggingface/hub")
    return str(constants.HF_HUB_CACHE)


def hub_cache_snapshot(name: str) -> Path | None:
    """The local snapshot of hub dataset ``name`` (its ``main`` revision) in the hub cache, as
    ``hf download`` / ``load_dataset`` left it; None when there is none. Offline: the cache only."""
    if not _REPO_ID.fullmatch(name):
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        with offline():
            return Path(snapshot_download(repo_id=name, repo_type="dataset", local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), not a valid id (HFValidationError), ...
        return None


@dataclass(frozen=True)
class HFSource:
    """One local Hugging Face dataset and the columns to read (picklable, a few strings)."""

    path: str
    audio_column: str = "audio"
    text_column: str = "text"
    id_column: str | None = None  # None: "id" when the dataset has it, else <label>/<row>
    recording_column: str | None = None  # the split key (None: each row its own recording)
    speaker_column: str | None = None  # for data.split_by=speaker
    split: str | None = None
    hub_name: str | None = None  # set when ``path`` was a hub name found in the hub cache

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))
        if Path(self.path).exists() or self.hub_name:
            return
        snapshot = hub_cache_snapshot(self.path)
        if snapshot is None:
            raise SourceError(
                f"--hf-dataset {self.path!r}: no such local file or folder, and no copy of a hub "
                f"dataset of that name in the hub cache ({hub_cache_dir()}). soda-mega never downloads "
                "datasets: save it on this machine first (`hf download --repo-type dataset NAME`, "
                "or datasets.load_dataset(NAME).save_to_disk(DIR)) and pass the name or that path")
        object.__setattr__(self, "hub_name", self.path)
        object.__setattr__(self, "path", str(snapshot))

    @property
    def label(self) -> str:
        """The dataset's name in ids and messages: its file or folder name, or the last part of
        its hub name (and split)."""
        if self.hub_name:
            name = self.hub_name.rsplit("/", 1)[-1]
        else:
            path = Path(self.path).resolve()
            name = path.stem if path.is_file() else path.name
        return f"{name}[{self.split}]" if self.split else name

    def open(self):
        """The ``datasets.Dataset`` (memory-mapped; the split chosen); :class:`SourceError` when
        the path holds no dataset the library can read."""
        datasets = import_datasets()
        path = Path(self.path)
        try:
            with offline():
                if path.is_file():
                    if path.suffix == ".arrow":
                        ds = datasets.Dataset.from_file(str(path))
                    elif path.suffix == ".parquet":
                        ds = datasets.load_dataset("parquet", data_files=[str(path.resolve())], split="train")
                    else:
                        raise SourceError(f"--hf-dataset {self.path}: a file must be .parquet or .arrow "
                                          "(or give a save_to_disk folder)")
                elif (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                    ds = datasets.load_from_disk(str(path))
                else:
                    ds = datasets.load_dataset(str(path.resolve()))
        except SourceError:
            raise
        except Exception as err:  # the library's own errors: FileNotFoundError, ValueError, ...
            raise SourceError(f"--hf-dataset {self.path}: the datasets library cannot read it "
                              f"({type(err).__name__}: {err})") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = sorted(ds)
            split = self.split or ("train" if "train" in ds else splits[0] if len(splits) == 1 else None)
            if split not in ds:
                raise SourceError(f"--hf-dataset {self.path} has the splits {', '.join(splits)}: choose one "
                                  f"with --split" + (f" ({self.split!r} is not one)" if self.split else ""))
            ds = ds[split]
        elif self.split and self.split != "train":
            raise SourceError(f"--hf-dataset {self.path} has a single split: drop --split {self.split}")
        return ds

    def columns(self, ds) -> tuple[str, str, str | None]:
        """``(audio, text, id)`` column names, checked against the dataset's columns."""
        have = list(ds.column_names)
        id_column = self.id_column if self.id_column is not None else ("id" if "id" in have else None)
        for flag, col in (("--audio-column", self.audio_column), ("--text-column", self.text_column),
                          ("--id-column", id_column)):
            if col is not None and col not in have:
                raise SourceError(f"--hf-dataset {self.path}: no column {col!r} ({flag}); its columns are "
                                  f"{', '.join(have)}")
        for flag, col in (("--recording-column", self.recording_column),
                          ("--speaker-column", self.speaker_column)):
            if col is not None and col not in have:
                raise SourceError(f"--hf-dataset {self.path}: no column {col!r} ({flag}); its columns are "
                                  f"{', '.join(have)}")
        return self.audio_column, self.text_column, id_column

    # ------------------------------------------------------------- planning (parent process)
    def plan(self) -> tuple[list[Recording], list[Skipped], dict]:
        """Every row as a :class:`Recording` (audio: an :class:`HFRow`), the rows that cannot be
        used (no text, a bad id, a repeated id), and the fingerprint of the dataset's files and
        of the column choices."""
        ds = self.open()
        audio_col, text_col, id_col = self.columns(ds)
        label = self.label
        recordings: list[Recording] = []
        skipped: list[Skipped] = []
        seen: dict[str, str] = {}
        cols = list(dict.fromkeys(c for c in (text_col, id_col, self.recording_column, self.speaker_column) if c))
        row = 0
        for batch in ds.select_columns(cols).iter(batch_size=PLAN_BATCH_ROWS):
            texts = batch[text_col]
            ids = batch[id_col] if id_col else [None] * len(texts)
            groups = zip(*(batch[c] if c else [None] * len(texts)
                           for c in (self.recording_column, self.speaker_column)))
            for text, rid, (recording, speaker) in zip(texts, ids, groups):
                where = f"{label}:row {row}"
                try:
                    rid = f"{label}/{row}" if id_col is None else _row_id(rid, id_col)
                except InputError as err:
                    skipped.append(Skipped(where, str(err)))
                    row += 1
                    continue
                try:
                    segments = (Segment(0.0, None, _text(text, f"{text_col!r}")),)
                except InputError as err:
                    skipped.append(Skipped(f"{rid} ({where})", str(err)))
                    row += 1
                    continue
                if rid in seen:
                    skipped.append(Skipped(f"{rid} ({where})", f"duplicate record id, first used at {seen[rid]}; "
                                           f"choose a column of unique ids with --id-column"))
                else:
                    seen[rid] = where
                    recordings.append(Recording(rid, where, HFRow(self, row), None, segments,
                                                *_split_cells(recording, speaker)))
                row += 1
        columns = {"audio": audio_col, "text": text_col, "id": id_col}
        columns.update({k: c for k, c in (("recording", self.recording_column), ("speaker", self.speaker_column)) if c})
        fingerprint = {"hf_dataset": str(Path(self.path).resolve()), "split": self.split, "columns": columns,
                       "rows": row,
                       "files": files_fingerprint(Path(self.path))}
        return recordings, skipped, fingerprint


def _split_cells(recording, speaker) -> tuple[str | None, tuple[str, ...]]:
    """``(recording, speakers)`` of a row (the split keys, :mod:`.splits`); an empty cell is none."""
    def key(value):
        return None if value is None or isinstance(value, bool) or str(value) == "" else str(value)
    return key(recording), (key(speaker),) if key(speaker) is not None else ()


def _row_id(value, column: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise InputError(f"id column {column!r} must hold a non-empty string or integer, got {value!r}")
    return str(value)


def files_fingerprint(path: Path) -> list[dict]:
    """Name, size and content hash of every file of a dataset (one file, or a folder's files but
    hidden ones): whole files up to 4 MiB, larger ones by 16 blocks of 1 MiB spread evenly from
    the first to the last byte, so that planning a terabyte dataset takes seconds."""
    if path.is_file():
        files = [(path.name, path)]
    else:
        files = sorted((str(p.relative_to(path)), p) for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return [{"name": name, "size": p.stat().st_size, "sha256": _sampled_sha256(p)} for name, p in files]


def _sampled_sha256(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            h.update(f.read())
        else:
            step = (size - SAMPLE_BLOCK) / (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):
                f.seek(int(i * step))
                h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


# ----------------------------------------------------------------- rows (worker processes)
# NOTE: per process, the datasets opened so far: a worker or feeder opens each one once (a
# memory map), then reads single rows.
_OPEN: dict[HFSource, object] = {}


def _audio_table(source: HFSource):
    if source not in _OPEN:
        datasets = import_datasets()
        ds = source.open().select_columns([source.audio_column])
        if isinstance(ds.features[source.audio_column], datasets.Audio):
            ds = ds.cast_column(source.audio_column, datasets.Audio(decode=False))
        _OPEN[source] = ds
    return _OPEN[source]


@dataclass(frozen=True)
class HFRow:
    """The audio of one dataset row: the dataset and the row index, never the samples."""

    source: HFSource
    row: int

    def read(self):
        """``(float32 [channels, samples], rate)`` of the row's audio; :class:`InputError` when
        the cell is empty or does not decode."""
        cell = _audio_table(self.source)[self.row][self.source.audio_column]
        name = f"of row {self.row}"
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
            if path:
                name += f" ({Path(path).name})"
            if data:
                return read_audio_bytes(data, name)
            if path:
                return read_audio(self._local(path), name)
            raise InputError(f"audio {name} is empty (neither bytes nor a path)")
        if isinstance(cell, (bytes, bytearray)):
            return read_audio_bytes(bytes(cell), name)
        if isinstance(cell, str) and cell:
            return read_audio(self._local(cell), name)
        raise InputError(f"audio {name}: column {self.source.audio_column!r} holds {type(cell).__name__}, "
                         "not audio (an Audio feature, encoded bytes or a file path)")

    def _local(self, path: str) -> str:
        """A path written in the dataset: absolute, or relative to the dataset's folder."""
        if Path(path).is_absolute():
            return path
        base = Path(self.source.path)
        return str((base.parent if base.is_file() else base) / path)

    def __str__(self) -> str:
        return f"{self.source.label}:row {self.row}"
