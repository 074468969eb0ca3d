"""``soda-mega data build``: inputs -> SODA documents -> MDS shards, in resumable work units.

Three kinds of dataset: ``speech`` (recording manifests -> interleaved / audio-only documents),
``text`` (corpora -> text-only documents) and ``s2st`` (translation-pair manifests -> one
``s2st`` fine-tuning document per pair, source part masked out of the loss).

1. **Plan** (parent): read the manifests (speech, s2st) or scan the corpora (text), drop bad
   lines, and cut the records into fixed work units (``data.build_unit_recordings`` recordings
   or pairs, ``data.build_unit_text_docs`` documents; text units never span two files). The plan's
   fingerprint covers the bytes of the manifests and corpora (not of the audio files a
   manifest names) and every setting that changes the output (not the device, batch size or
   streaming step, which change speed only); it is kept in ``.build/plan.json`` and a folder
   holding another plan is never resumed silently.
2. **Work** (``data.build_workers`` spawned processes, or in-process for 0): each unit's
   recordings are read, encoded with Mimi (or taken from ``.npy`` codes), tokenized and
   turned into documents (both sides of an s2st pair go through the codec in the same
   batches as recordings do); each record goes to ``train`` or ``valid`` by a hash of its id,
   so both interleaved orders of a recording always land in the same split and the split
   does not depend on input order or worker count. Units are written by
   :class:`~soda_mega.data.writer.UnitWriter` (temp folder, rename, then marker).
3. **Merge** (parent): per split, the units' shards are indexed in unit order and
   ``doc_lengths.npy`` and ``soda_meta.json`` are written (see :mod:`.schema`).

Rerunning an interrupted build skips the marked units, deletes half-written ones and
produces the same bytes as an uninterrupted build. Bad records are named on stderr, counted
in ``skipped`` and never stop the build; real failures (a bug, out of memory) do stop it,
and the finished units are kept for the rerun.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from soda_mega.config.fields import ConfigError
from soda_mega.config.schema import DataConfig, SodaConfig
from soda_mega.data.codec import (MIMI_CODEBOOK_SIZE, MIMI_FRAME_RATE, MimiCodec, file_sha256,
                                  mimi_metadata, precomputed_codec_metadata, warn_random_init)
from soda_mega.data.documents import (recording_documents, s2st_document, segment_frames,
                                      text_document)
from soda_mega.data.inputs import (InputError, Recording, S2STPair, Skipped, TextRange, load_codes,
                                   plan_text, read_audio, read_manifest, read_s2st_manifest,
                                   read_text_range, text_format)
from soda_mega.data.progress import Progress
from soda_mega.data.schema import FORMAT, SPLITS
from soda_mega.data.tokenizer import load_tokenizer
from soda_mega.data.writer import (STATE_DIR, UnitWriter, atomic_write_text, clean_partial_units,
                                   marker_path, merge_split, remove_merged_files)
from soda_mega.tokens.layout import VocabLayout

PLAN_FILE = "plan.json"
KINDS = ("speech", "text", "s2st")
# Kinds whose records hold audio (recordings, translation pairs), planned as manifests.
AUDIO_KINDS = ("speech", "s2st")


class BuildError(RuntimeError):
    """The build cannot start or continue; the message says what to do."""


def split_of(record_id: str, valid_fraction: float) -> str:
    """``valid`` for a stable ``valid_fraction`` share of record ids, else ``train``."""
    h = int.from_bytes(hashlib.sha256(record_id.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return "valid" if h / 2.0**64 < valid_fraction else "train"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs (picklable)."""

    root: str
    kind: str
    layout: dict
    tokenizer: str | None
    doc_types: tuple[str, ...]
    valid_fraction: float
    shard_size_limit: int
    codec: dict | None = None  # MimiCodec kwargs, None when no record needs encoding
    threads: int = 0  # torch threads per worker (0 = leave torch's default)


@dataclass
class BuildResult:
    """What a build produced (also printed by the CLI)."""

    root: str
    kind: str
    splits: dict[str, dict]
    units: int
    units_resumed: int
    records: int
    seconds: float
    skipped: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------- worker side
_STATE: dict = {}
# NOTE: the last codec built in this process, reused by the next in-process build with the same
# settings (the demo builds twice; tests build many times): building Mimi takes seconds.
_CODEC_CACHE: dict[str, MimiCodec] = {}


def _codec(settings: dict) -> MimiCodec:
    runtime = {k: settings[k] for k in ("chunk_seconds", "batch_size")}
    key = json.dumps({k: v for k, v in settings.items() if k not in runtime}, sort_keys=True)
    if key not in _CODEC_CACHE:
        _CODEC_CACHE.clear()
        _CODEC_CACHE[key] = MimiCodec(**settings, warn=False)
    codec = _CODEC_CACHE[key]
    codec.configure(**runtime)
    return codec


def _init_worker(spec: WorkerSpec, progress_queue=None) -> None:
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    layout = VocabLayout.from_dict(spec.layout)
    _STATE.clear()
    _STATE.update(spec=spec, layout=layout, queue=progress_queue,
                  tokenizer=load_tokenizer(spec.tokenizer, layout, announce=False),
                  codec=_codec(spec.codec) if spec.codec else None)


def _report(records: int, seconds: float = 0.0, skipped: int = 0) -> None:
    q = _STATE.get("queue")
    if q is not None:
        q.put((records, seconds, skipped))
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


def _recording_docs(rec: Recording, codes: np.ndarray, frame_rate: float):
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


def _load_codes(sources: Sequence[tuple[str | None, str | None]]) -> list[tuple]:
    """``(codes [K, T] | InputError, seconds)`` for each ``(audio file, codes file)`` source.

    Pre-encoded codes are read and checked; all audio files of the list are encoded in one
    :meth:`~soda_mega.data.codec.MimiCodec.encode_batch` call (padded GPU batches of
    ``data.encode_batch_size``). An unusable source comes back as its ``InputError``.
    """
    layout: VocabLayout = _STATE["layout"]
    loaded: list[list] = []  # [codes | (wav, rate) | InputError, seconds]
    for audio, codes_path in sources:
        try:
            if codes_path is not None:
                codes = load_codes(codes_path, layout.num_codebooks, layout.codebook_size)
                loaded.append([codes, codes.shape[1] / _frame_rate()])
            else:
                wav, rate = read_audio(audio)
                loaded.append([(wav, rate), wav.shape[1] / rate])
        except InputError as err:
            loaded.append([err, 0.0])
    todo = [item for item in loaded if isinstance(item[0], tuple)]
    if todo:
        encoded = _STATE["codec"].encode_batch([i[0][0] for i in todo], [i[0][1] for i in todo])
        for item, codes in zip(todo, encoded):
            item[0] = codes.numpy()
    return [tuple(item) for item in loaded]


def _speech_unit(writer: UnitWriter, recordings: Sequence[Recording]) -> None:
    spec: WorkerSpec = _STATE["spec"]
    frame_rate = _frame_rate()
    batch = _batch_size()
    for start in range(0, len(recordings), batch):
        group = recordings[start:start + batch]
        sides = _load_codes([(r.audio, r.codes) for r in group])
        for rec, (codes, seconds) in zip(group, sides):
            split = split_of(rec.record_id, spec.valid_fraction)
            name = f"{rec.record_id} ({rec.where})"
            try:
                if isinstance(codes, InputError):
                    raise codes
                docs = _recording_docs(rec, codes, frame_rate)
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
    for start in range(0, len(pairs), batch):
        group = pairs[start:start + batch]
        sides = _load_codes([side for p in group for side in ((p.source_audio, p.source_codes),
                                                                (p.target_audio, p.target_codes))])
        for i, pair in enumerate(group):
            (src, src_s), (tgt, tgt_s) = sides[2 * i], sides[2 * i + 1]
            split = split_of(pair.record_id, spec.valid_fraction)
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
    """Build one work unit and mark it complete; returns its marker."""
    spec: WorkerSpec = _STATE["spec"]
    writer = UnitWriter(Path(spec.root), name, _STATE["layout"], spec.shard_size_limit)
    {"speech": _speech_unit, "text": _text_unit, "s2st": _s2st_unit}[spec.kind](writer, items)
    return writer.commit()


# ----------------------------------------------------------------- planning
@dataclass
class Plan:
    kind: str
    units: list[tuple[str, list]]  # (unit name, recordings or text ranges)
    skipped: list[Skipped]  # input lines rejected while planning
    records: int
    settings: dict

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:24]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def make_plan(kind: str, inputs: Sequence[str | Path], cfg: SodaConfig, layout: VocabLayout,
              tokenizer_meta: dict, codec_meta: Callable[[bool], dict | None]) -> Plan:
    """Read/scan the inputs and cut them into work units (see the module docstring)."""
    data: DataConfig = cfg.data
    units: list[list] = []
    skipped: list[Skipped] = []
    records = 0
    has_audio = False
    if kind in AUDIO_KINDS:
        read = read_manifest if kind == "speech" else read_s2st_manifest
        recordings: list = []
        seen: dict[str, str] = {}
        for path in inputs:
            recs, bad = read(path)
            skipped += bad
            for rec in recs:
                if rec.record_id in seen:
                    skipped.append(Skipped(f"{rec.record_id} ({rec.where})",
                                           f"duplicate record id, first used at {seen[rec.record_id]}"))
                    continue
                seen[rec.record_id] = rec.where
                recordings.append(rec)
        if kind == "speech":
            has_audio = any(r.audio is not None for r in recordings)
            doc_types = list(data.doc_types)
        else:
            has_audio = any(p.source_audio is not None or p.target_audio is not None for p in recordings)
            doc_types = ["s2st"]
        units = _chunks(recordings, data.build_unit_recordings)
        records = len(recordings)
    else:
        for path in inputs:
            ranges = plan_text(path, text_format(path, data.text_split), data.build_unit_text_docs)
            units += [[r] for r in ranges]
            records += sum(r.num_docs for r in ranges)
        doc_types = ["text_only"]
    settings = {
        "format": FORMAT, "kind": kind, "vocab_fingerprint": layout.fingerprint(),
        "tokenizer": tokenizer_meta, "codec": codec_meta(has_audio) if kind in AUDIO_KINDS else None,
        "doc_types": doc_types, "valid_fraction": data.valid_fraction,
        "unit_size": data.build_unit_recordings if kind in AUDIO_KINDS else data.build_unit_text_docs,
        "shard_size_limit": data.shard_size_limit,
        "text_split": data.text_split if kind == "text" else None,
        "inputs": [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for p in inputs],
    }
    named = [(f"u{i:06d}", items) for i, items in enumerate(units)]
    return Plan(kind, named, skipped, records + len(skipped), settings)


def _prepare_root(root: Path, plan: Plan, overwrite: bool) -> None:
    """Start, resume or refuse: a folder holding another plan needs ``overwrite``."""
    state = root / STATE_DIR
    plan_path = state / PLAN_FILE
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if old.get("fingerprint") != plan.fingerprint and not overwrite:
            changed = sorted(k for k in set(old.get("settings", {})) | set(plan.settings)
                             if old.get("settings", {}).get(k) != plan.settings.get(k))
            raise BuildError(f"{root} holds a build of other inputs or settings (changed: "
                             f"{', '.join(changed) or 'format'}); pass --overwrite to replace it, "
                             "or build into another folder")
        if old.get("fingerprint") == plan.fingerprint:
            return
    elif root.is_dir() and any(root.iterdir()) and not overwrite:
        raise BuildError(f"{root} exists and is not a soda-mega build folder; pass --overwrite to build "
                         "into it anyway, or pick an empty or new folder")
    for name in (*SPLITS, STATE_DIR):
        shutil.rmtree(root / name, ignore_errors=True)
    state.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan_path, json.dumps({"fingerprint": plan.fingerprint, "settings": plan.settings,
                                             "units": len(plan.units),
                                             "skipped": [s.to_dict() for s in plan.skipped]}, indent=2))


# ----------------------------------------------------------------- the build
def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_dataset(out: str | Path, inputs: Sequence[str | Path], kind: str, cfg: SodaConfig, *,
                  overwrite: bool = False, workers: int | None = None, show_progress: bool = True,
                  on_unit_done: Callable[[str, int], None] | None = None) -> BuildResult:
    """Build (or resume) one dataset of ``kind``: ``speech`` from recording manifests, ``text``
    from corpora, ``s2st`` from translation-pair manifests.

    ``workers`` overrides ``cfg.data.build_workers``. ``on_unit_done(name, completed)`` is called
    in this process after each unit is marked complete (tests use it to interrupt a build).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not inputs:
        raise BuildError("no inputs: give --manifest FILE (speech), --text FILE (text) or "
                         "--s2st FILE (translation pairs)")
    for path in inputs:
        if not Path(path).is_file():
            raise BuildError(f"input {path} does not exist")
    t0 = time.monotonic()
    root = Path(out)
    data = cfg.data
    layout = VocabLayout.from_config(cfg.vocab)
    tokenizer = load_tokenizer(data.tokenizer, layout, announce=show_progress)
    if data.mimi_weights and not Path(data.mimi_weights).is_file():
        raise ConfigError(f"data.mimi_weights: {data.mimi_weights!r} does not exist; give a local Mimi "
                          "weights file (nothing is downloaded)")
    weights_sha = file_sha256(data.mimi_weights) if data.mimi_weights else None

    def codec_meta(has_audio: bool) -> dict:
        if not has_audio:
            return precomputed_codec_metadata(layout.num_codebooks, layout.codebook_size)
        if layout.codebook_size != MIMI_CODEBOOK_SIZE:
            raise ConfigError(f"vocab.codebook_size: Mimi codebooks have {MIMI_CODEBOOK_SIZE} entries, "
                              f"the layout says {layout.codebook_size}")
        weights = str(Path(data.mimi_weights).resolve()) if data.mimi_weights else None
        return mimi_metadata(layout.num_codebooks, weights, weights_sha, data.mimi_seed)

    plan = make_plan(kind, inputs, cfg, layout, tokenizer.metadata(), codec_meta)
    _prepare_root(root, plan, overwrite)
    for s in plan.skipped:
        print(f"[soda-mega data] skipped {s.record}: {s.reason}", file=sys.stderr)
    removed = clean_partial_units(root)
    done = {name for name, _ in plan.units if marker_path(root, name).is_file()}
    pending = [(name, items) for name, items in plan.units if name not in done]
    codec_settings = plan.settings["codec"]
    needs_codec = bool(codec_settings and codec_settings["name"] == "mimi" and pending)
    if needs_codec and codec_settings["random_init"] and show_progress:
        warn_random_init(data.mimi_seed)
    label = f"data build {kind} -> {root}"
    if show_progress:
        print(f"[{label}] {plan.records} records in {len(plan.units)} units; {len(done)} already done"
              + (f", removed {len(removed)} half-written" if removed else ""), file=sys.stderr)
    if pending:
        remove_merged_files(root)
        n_workers = data.build_workers if workers is None else workers
        n_workers = min(n_workers, len(pending))
        spec = WorkerSpec(
            root=str(root), kind=kind, layout=layout.to_dict(), tokenizer=data.tokenizer,
            doc_types=tuple(data.doc_types), valid_fraction=data.valid_fraction,
            shard_size_limit=data.shard_size_limit,
            codec=dict(weights=data.mimi_weights, num_codebooks=layout.num_codebooks,
                       device=data.codec_device, chunk_seconds=data.encode_chunk_seconds,
                       batch_size=data.encode_batch_size, seed=data.mimi_seed,
                       weights_sha256=weights_sha) if needs_codec else None,
            threads=max(1, _cpu_count() // n_workers) if n_workers > 1 else 0)
        done_records = sum(len(items) if kind in AUDIO_KINDS else sum(r.num_docs for r in items)
                           for name, items in plan.units if name in done) + len(plan.skipped)
        progress = Progress(label, plan.records, done_records, enabled=show_progress)
        if n_workers <= 1:
            _run_inline(spec, pending, progress, on_unit_done, len(done))
        else:
            _run_pool(spec, pending, progress, on_unit_done, len(done), n_workers)
        progress.finish()
    return _merge(root, plan, layout, tokenizer.metadata(), len(done), time.monotonic() - t0)


def _run_inline(spec, pending, progress, on_unit_done, completed) -> None:
    _init_worker(spec, None)
    _STATE["progress"] = progress
    try:
        for name, items in pending:
            run_unit(name, items)
            completed += 1
            if on_unit_done:
                on_unit_done(name, completed)
    finally:
        _STATE.clear()


def _run_pool(spec, pending, progress, on_unit_done, completed, n_workers) -> None:
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(spec, reports))

    def drain() -> None:
        while True:
            try:
                records, seconds, skipped = reports.get_nowait()
            except queue_mod.Empty:
                return
            progress.advance(records, seconds, skipped)

    try:
        futures = {pool.submit(run_unit, name, items): name for name, items in pending}
        while futures:
            finished, _ = wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
            drain()
            for fut in finished:
                name = futures.pop(fut)
                try:
                    fut.result()
                except Exception as err:
                    raise BuildError(f"work unit {name} failed ({type(err).__name__}: {err}); the finished "
                                     "units are kept, rerun the same command to resume") from err
                completed += 1
                if on_unit_done:
                    on_unit_done(name, completed)
        drain()
    except BaseException:
        # NOTE: interrupted (Ctrl-C) or failed: stop now. Units in progress are abandoned; their temp
        # folders are removed and the units redone by the next run, finished units are kept.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        reports.close()


def _merge(root: Path, plan: Plan, layout: VocabLayout, tokenizer_meta: dict, resumed: int,
           seconds: float) -> BuildResult:
    names = [name for name, _ in plan.units]
    markers = {name: json.loads(marker_path(root, name).read_text()) for name in names}
    plan_skips = {s: [] for s in SPLITS}
    for s in plan.skipped:
        plan_skips[split_of(s.record, plan.settings["valid_fraction"])].append(s.to_dict())
    _check_train_not_empty(plan, markers, plan_skips)
    metas = {}
    for split in SPLITS:
        base = {"kind": plan.kind, "vocab_layout": layout.to_dict(),
                "vocab_fingerprint": layout.fingerprint(), "codec": plan.settings["codec"],
                "tokenizer": tokenizer_meta,
                "build": {"fingerprint": plan.fingerprint, "inputs": plan.settings["inputs"],
                          "doc_types": plan.settings["doc_types"],
                          "valid_fraction": plan.settings["valid_fraction"]}}
        meta = merge_split(root, split, names, markers, base, plan_skips[split])
        metas[split] = meta
    skipped = [s for m in metas.values() for s in m["skipped"]]
    return BuildResult(str(root), plan.kind, metas, len(plan.units), resumed, plan.records, seconds, skipped)


def _check_train_not_empty(plan: Plan, markers: dict[str, dict], plan_skips: dict[str, list]) -> None:
    """A build without a single training document is a failure, not a dataset (nothing is merged)."""
    docs = {split: sum(m["splits"][split]["num_docs"] for m in markers.values()) for split in SPLITS}
    if docs["train"]:
        return
    skipped = [s for split in SPLITS for s in plan_skips[split]]
    skipped += [s for m in markers.values() for split in SPLITS for s in m["splits"][split]["skipped"]]
    why = f"{plan.records} records, {len(skipped)} skipped"
    if skipped:
        why += f" (first: {skipped[0]['record']}: {skipped[0]['reason']})"
    if docs["valid"]:
        why += (f"; all {docs['valid']} documents went to the valid split: lower data.valid_fraction "
                f"(now {plan.settings['valid_fraction']}) or add records")
    raise BuildError(f"the train split is empty: {why}. The finished work units are kept; fix the "
                     "inputs or settings and rerun (with --overwrite: they are a new plan)")


def summary_lines(result: BuildResult) -> list[str]:
    """Human summary of a build, one line per split."""
    lines = [f"built {result.kind} dataset {result.root} in {result.seconds:.1f} s "
             f"({result.units} units, {result.units_resumed} reused)"]
    for split, meta in result.splits.items():
        tok = meta["tokens"]
        lines.append(f"  {split:<5} {meta['num_docs']:>7} docs  {tok['total']:>11,} tokens "
                     f"(text {tok['text']:,}, special {tok['special']:,}, semantic {tok['semantic']:,}, "
                     f"acoustic {tok['acoustic']:,})  {meta['audio_hours']:.3f} h audio  "
                     f"skipped {len(meta['skipped'])}")
    if not result.splits["valid"]["num_docs"]:
        lines.append("  NOTE: the valid split is empty; raise data.valid_fraction or add records")
    return lines


def result_dict(result: BuildResult) -> dict:
    return asdict(result)
