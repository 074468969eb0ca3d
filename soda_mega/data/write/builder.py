"""``soda-mega data build``: inputs -> SODA documents -> MDS shards, in resumable work units.

Three kinds of dataset: ``speech`` (recording manifests -> interleaved / audio-only documents),
``text`` (corpora -> text-only documents) and ``s2st`` (translation-pair manifests -> one
``s2st`` fine-tuning document per pair, source part masked out of the loss).

1. **Plan** (parent): read the manifests (speech, s2st; or a local Hugging Face dataset or Lhotse
   manifest, :func:`is_source`) or scan the corpora (text), drop bad lines, and cut the records
   into fixed work units (``data.build_unit_recordings`` recordings or pairs,
   ``data.build_unit_text_docs`` documents; text units never span two files). The plan's
   fingerprint covers the bytes of the manifests and corpora (not of the audio files a
   manifest names; a Hugging Face dataset's files, which hold its audio) and every setting
   that changes the output (not the device, batch size or streaming step, which change speed
   only); it is kept in ``.build/plan.json`` and a folder
   holding another plan is never resumed silently.
2. **Work** (:mod:`.build_worker`; ``data.build_workers`` spawned processes on the CPU path,
   one codec worker per device on the device path of :mod:`.devices`, or in-process): each
   unit's recordings are read, encoded with Mimi (or taken from ``.npy`` codes), tokenized and
   turned into documents; each record goes to ``train`` or ``valid`` by a hash of its
   recording (or speaker group, :mod:`.splits`; a text document by its id), so the split does
   not depend on input order, worker count or device, and a recording is never in both. Units are written by
   :class:`~soda_mega.data.write.writer.UnitWriter` (temp folder, rename, then marker).
3. **Merge** (parent): per split, the units' shards are indexed in unit order and
   ``doc_lengths.npy`` and ``soda_meta.json`` are written (see :mod:`.schema`), from the unit
   markers alone. A build without a single train document fails here.

**Parts.** ``part=(i, n)`` (``data build --part I/N``, or a SLURM job array) builds only the
units ``u`` with ``u % n == i`` into the same ``OUT``, so any number of machines share one
build. Every part writes the same plan; the part that finds every unit marked when it ends
merges (or ``data build --finalize OUT`` does). Units, markers and merge are the same code as a
one-machine build, so the result is the same bytes, whatever the order parts run or rerun in.

**Remote OUT** (``s3://...``, :mod:`.target`): shards are staged locally and uploaded by
streaming's ``MDSWriter`` as they are written; markers, plan and merged index follow through
streaming's ``CloudUploader``. The bytes under the prefix equal those of a local build.

Rerunning an interrupted build (or part) skips the marked units, deletes half-written ones and
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
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from soda_mega.config.fields import ConfigError
from soda_mega.config.schema import DataConfig, SodaConfig
from soda_mega.data.codec import (
    MIMI_CODEBOOK_SIZE,
    check_mimi_weights,
    file_sha256,
    mimi_metadata,
    precomputed_codec_metadata,
    warn_random_init,
)
from soda_mega.data.schema import FORMAT, SPLITS
from soda_mega.data.tokenizer import load_tokenizer
from soda_mega.data.write.build_worker import init_worker, run_unit, set_progress, shutdown_worker, worker_device
from soda_mega.data.write.devices import codec_devices, feeders_per_device
from soda_mega.data.write.inputs import Skipped, plan_text, read_manifest, read_s2st_manifest, text_format
from soda_mega.data.write.part_lock import PartLock
from soda_mega.data.write.progress import Progress
from soda_mega.data.write.splits import assign_groups, split_of
from soda_mega.data.write.target import BuildTarget
from soda_mega.data.write.worker_spec import INIT_WORKER, WorkerSpec
from soda_mega.data.write.writer import (
    MERGED_FILES,
    STATE_DIR,
    UNITS_DIR,
    atomic_write_text,
    check_marker,
    clean_partial_units,
    marker_path,
    marker_rel,
    merge_split,
    remove_merged_files,
)
from soda_mega.errors import SodaUserError
from soda_mega.tokens.layout import VocabLayout
from soda_mega.utils.lifetime import spawned_dying_with

__all__ = ["BuildError", "BuildResult", "build_dataset", "finalize_dataset", "make_plan", "parse_part",
           "part_from_env", "part_units", "result_dict", "split_of", "summary_lines"]

PLAN_FILE = "plan.json"
PLAN_REL = f"{STATE_DIR}/{PLAN_FILE}"
KINDS = ("speech", "text", "s2st")
# Kinds whose records hold audio (recordings, translation pairs), planned as manifests.
AUDIO_KINDS = ("speech", "s2st")


class BuildError(SodaUserError, RuntimeError):
    """The build cannot start or continue; the message says what to do (exit 2)."""


@dataclass
class BuildResult:
    """What a build (or one part of it) produced (also printed by the CLI)."""

    root: str
    kind: str
    splits: dict[str, dict]  # empty until the dataset is merged (finalized)
    units: int
    units_resumed: int
    records: int
    seconds: float
    skipped: list[dict] = field(default_factory=list)
    finalized: bool = True
    part: str | None = None  # "I/N" for one part of a split build
    units_built: int = 0  # units this run built
    units_missing: int = 0  # units of the plan not marked yet (other parts still running)
    worker_devices: dict[str, str | None] = field(default_factory=dict)  # worker pid -> codec device


def unit_name(index: int) -> str:
    return f"u{index:06d}"


# ----------------------------------------------------------------- parts
def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N) -> ``(I, N)``; ``BuildError`` naming the value otherwise."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise BuildError(f"--part {text!r}: give I/N, e.g. 0/4 for the first of 4 parts") from None
    if n < 1 or not 0 <= i < n:
        raise BuildError(f"--part {text!r}: need 0 <= I < N")
    return i, n


def part_from_env(env: dict | None = None) -> tuple[int, int] | None:
    """The part of a SLURM array task: ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
    SLURM_ARRAY_TASK_STEP`` of ``SLURM_ARRAY_TASK_COUNT`` (None outside a job array), so that
    ``--array=0-N`` and ``--array=0-30:2`` both number their tasks' parts 0, 1, 2, ..."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
    except ValueError:
        raise BuildError("SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_MIN / "
                         "SLURM_ARRAY_TASK_STEP are not integers") from None
    index, off_step = divmod(task - first, max(step, 1))
    if off_step or not 0 <= index < count:
        raise BuildError(
            f"SLURM_ARRAY_TASK_ID={task} is not one of {count} evenly spaced tasks from "
            f"SLURM_ARRAY_TASK_MIN={first} in steps of {step}: the array's ids do not number its "
            f"parts; submit with --array=0-{count - 1} (or a range with a step), or give --part I/N")
    return index, count


def part_units(num_units: int, part: tuple[int, int] | None) -> list[int]:
    """Indices of the units part ``(i, n)`` builds: every n-th from i (all for None).

    Round robin, so neighbouring units (often of similar size: one input file) spread over the
    parts; the shares are disjoint and together cover every unit."""
    if part is None:
        return list(range(num_units))
    i, n = part
    return list(range(i, num_units, n))


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

    def stored(self, layout: VocabLayout) -> dict:
        """``.build/plan.json``: everything the merge needs (``--finalize`` reads only this)."""
        return {"fingerprint": self.fingerprint, "settings": self.settings, "units": len(self.units),
                "records": self.records, "layout": layout.to_dict(),
                "skipped": [s.to_dict() for s in self.skipped]}


def is_source(item) -> bool:
    """An input that plans itself (``plan() -> (recordings, skipped, fingerprint)``): a local
    Hugging Face dataset (:class:`~soda_mega.data.write.hf_input.HFSource`) or a Lhotse manifest
    (:class:`~soda_mega.data.write.lhotse_input.LhotseSource`); other inputs are file paths."""
    return callable(getattr(item, "plan", None))


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
        fingerprints = []
        for path in inputs:
            if is_source(path):  # a Hugging Face dataset, a Lhotse manifest (hf_input, lhotse_input)
                recs, bad, fp = path.plan()
                fingerprints.append(fp)
            else:
                recs, bad = read(path)
                fingerprints.append({"path": str(Path(path).resolve()), "sha256": file_sha256(path)})
            skipped += bad
            for rec in recs:
                if rec.record_id in seen:
                    skipped.append(Skipped(f"{rec.record_id} ({rec.where})",
                                           f"duplicate record id, first used at {seen[rec.record_id]}"))
                    continue
                seen[rec.record_id] = rec.where
                recordings.append(rec)
        recordings = assign_groups(recordings, data.split_by)
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
        fingerprints = [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for p in inputs]
    settings = {
        "format": FORMAT, "kind": kind, "vocab_fingerprint": layout.fingerprint(),
        "tokenizer": tokenizer_meta, "codec": codec_meta(has_audio) if kind in AUDIO_KINDS else None,
        "doc_types": doc_types, "valid_fraction": data.valid_fraction,
        "unit_size": data.build_unit_recordings if kind in AUDIO_KINDS else data.build_unit_text_docs,
        "shard_size_limit": data.shard_size_limit,
        "text_split": data.text_split if kind == "text" else None,
        "inputs": fingerprints,
    }
    if kind in AUDIO_KINDS:
        settings["split_by"] = data.split_by  # NOTE: absent for text, whose split goes by id
    named = [(unit_name(i), items) for i, items in enumerate(units)]
    return Plan(kind, named, skipped, records + len(skipped), settings)



# ----------------------------------------------------------------- the output folder
def _changed(old: dict, plan: Plan) -> str:
    changed = sorted(k for k in set(old.get("settings", {})) | set(plan.settings)
                     if old.get("settings", {}).get(k) != plan.settings.get(k))
    return ", ".join(changed) or "format"


def _prepare_local(root: Path, plan: Plan, stored: dict, overwrite: bool) -> None:
    """Start, resume or refuse a local folder: one holding another plan needs ``overwrite``.

    Parts of one build start at the same time: a folder holding only ``.build`` (without unit
    markers) is a fresh build another part has just begun, and nothing is deleted then."""
    state = root / STATE_DIR
    plan_path = root / PLAN_REL
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if old.get("fingerprint") == plan.fingerprint:
            if old != stored:  # written by an older version: same plan, more fields
                atomic_write_text(plan_path, json.dumps(stored, indent=2))
            return
        if not overwrite:
            raise BuildError(f"{root} holds a build of other inputs or settings (changed: "
                             f"{_changed(old, plan)}); pass --overwrite to replace it, "
                             "or build into another folder")
        wipe = True
    else:
        foreign = root.is_dir() and any(p.name != STATE_DIR for p in root.iterdir())
        markers = (state / UNITS_DIR).is_dir() and any((state / UNITS_DIR).iterdir())
        if (foreign or markers) and not overwrite:
            raise BuildError(f"{root} exists and is not a soda-mega build folder; pass --overwrite to build "
                             "into it anyway, or pick an empty or new folder")
        wipe = foreign or markers
    if wipe:
        for name in (*SPLITS, STATE_DIR):
            shutil.rmtree(root / name, ignore_errors=True)
    state.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan_path, json.dumps(stored, indent=2))


def _prepare_remote(target: BuildTarget, plan: Plan, stored: dict, overwrite: bool) -> None:
    """The same for a remote prefix; there, nothing is ever deleted (no ``--overwrite``)."""
    if target.listing(PLAN_REL):
        target.fetch([PLAN_REL])
        old = json.loads((target.root / PLAN_REL).read_text())
        (target.root / PLAN_REL).unlink()
        if old.get("fingerprint") != plan.fingerprint:
            raise BuildError(f"{target.out} holds a build of other inputs or settings (changed: "
                             f"{_changed(old, plan)}); remote outputs are never deleted by soda-mega: "
                             "build into another prefix, or delete this one yourself")
        if old == stored:
            return
    elif target.listing(""):
        raise BuildError(f"{target.out} is not empty and holds no soda-mega build; build into an empty "
                         "prefix")
    if overwrite:
        print(f"[soda-mega data] --overwrite has no effect on a remote OUT ({target.out})", file=sys.stderr)
    path = target.root / PLAN_REL
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(stored, indent=2))
    target.publish(PLAN_REL)


def _marked_units(target: BuildTarget, names: Sequence[str]) -> set[str]:
    """The units of ``names`` whose completion marker exists (locally, or on the remote)."""
    if target.remote is None:
        return {n for n in names if marker_path(target.root, n).is_file()}
    listed = {Path(k).stem for k in target.listing(f"{STATE_DIR}/{UNITS_DIR}/") if k.endswith(".json")}
    return listed & set(names)


def _load_stored_plan(target: BuildTarget) -> dict:
    if target.remote is not None:
        if not target.listing(PLAN_REL):
            raise BuildError(f"{target.out} holds no soda-mega build (no {PLAN_REL}); run `data build` "
                             "with the inputs first")
        target.fetch([PLAN_REL])
    path = target.root / PLAN_REL
    if not path.is_file():
        raise BuildError(f"{target.out} holds no soda-mega build (no {PLAN_REL}); run `data build` with "
                         "the inputs first")
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BuildError(f"{target.out}/{PLAN_REL} is not valid JSON ({err.msg}); rerun `data build` with "
                         "the inputs") from None
    finally:
        if target.remote is not None:
            path.unlink(missing_ok=True)
    if "layout" not in stored:
        raise BuildError(f"{target.out}/{PLAN_REL} was written by an older soda-mega; rerun `data build` "
                         "with the inputs (finished units are reused) instead of --finalize")
    return stored


# ----------------------------------------------------------------- the build
def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_dataset(out: str | Path, inputs: Sequence[str | Path], kind: str, cfg: SodaConfig, *,
                  overwrite: bool = False, workers: int | None = None, show_progress: bool = True,
                  on_unit_done: Callable[[str, int], None] | None = None,
                  part: tuple[int, int] | None = None, staging: str | Path | None = None) -> BuildResult:
    """Build (or resume) one dataset of ``kind``: ``speech`` from recording manifests, ``text``
    from corpora, ``s2st`` from translation-pair manifests.

    ``out`` is a folder or a remote prefix (``s3://bucket/ds``; ``staging`` is then the local
    folder shards pass through, a temporary one by default). ``part=(i, n)`` builds only that
    share of the units (see the module docstring); the dataset is merged when every unit of the
    plan is marked. ``workers`` overrides ``cfg.data.build_workers``. ``on_unit_done(name,
    completed)`` is called in this process after each unit is marked complete (tests use it to
    interrupt a build).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not inputs:
        raise BuildError("no inputs: give --manifest FILE (speech), --text FILE (text) or "
                         "--s2st FILE (translation pairs)")
    for path in inputs:
        if is_source(path) and kind != "speech":
            raise BuildError(f"{path} is a recording source: it builds a speech dataset, not {kind}")
        if not is_source(path) and not Path(path).is_file():
            raise BuildError(f"input {path} does not exist")
    t0 = time.monotonic()
    data = cfg.data
    layout = VocabLayout.from_config(cfg.vocab)
    tokenizer = load_tokenizer(data.tokenizer, layout, announce=show_progress)
    if data.mimi_weights and not Path(data.mimi_weights).is_file():
        raise ConfigError(f"data.mimi_weights: {data.mimi_weights!r} does not exist; give a local Mimi "
                          "weights file (nothing is downloaded)")
    if data.mimi_weights:
        check_mimi_weights(data.mimi_weights)  # safetensors only, refused here, not in a worker
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
    stored = plan.stored(layout)
    target = BuildTarget(out, staging)
    try:
        return _build(target, plan, stored, cfg, overwrite, workers, show_progress, on_unit_done, part, t0)
    finally:
        target.close()


def _build(target: BuildTarget, plan: Plan, stored: dict, cfg: SodaConfig, overwrite: bool,
           workers: int | None, show_progress: bool, on_unit_done, part, t0: float) -> BuildResult:
    root = target.root
    if target.remote is None:
        _prepare_local(root, plan, stored, overwrite)
    else:
        _prepare_remote(target, plan, stored, overwrite)
    if part is None or part[0] == 0:  # bad manifest lines: said once, by the first part
        for s in plan.skipped:
            print(f"[soda-mega data] skipped {s.record}: {s.reason}", file=sys.stderr)
    with PartLock(root, part) as lock:
        if lock.note and show_progress:
            print(f"[soda-mega data] {lock.note}", file=sys.stderr)
        return _build_share(target, plan, stored, cfg, workers, show_progress, on_unit_done, part, t0)


def _build_share(target: BuildTarget, plan: Plan, stored: dict, cfg: SodaConfig, workers: int | None,
                 show_progress: bool, on_unit_done, part, t0: float) -> BuildResult:
    """The units of this part (all for a whole build), then the merge if none is missing."""
    data = cfg.data
    root = target.root
    names = [name for name, _ in plan.units]
    share = [plan.units[i] for i in part_units(len(plan.units), part)]
    removed = clean_partial_units(root, [name for name, _ in share])
    done = _marked_units(target, [name for name, _ in share])
    pending = [(name, items) for name, items in share if name not in done]
    codec_settings = plan.settings["codec"]
    needs_codec = bool(codec_settings and codec_settings["name"] == "mimi" and pending)
    if needs_codec and codec_settings["random_init"] and show_progress:
        warn_random_init(data.mimi_seed)
    part_label = f"{part[0]}/{part[1]}" if part else None
    label = f"data build {plan.kind} -> {target.out}" + (f" (part {part_label})" if part else "")
    if part and part[1] > len(plan.units):
        # NOTE: said by every part, also with --quiet: an array task that finds nothing to do
        # looks like a successful one in squeue and sacct.
        idle, unit = part[1] - len(plan.units), plan.settings.get("unit_size")
        setting = ("data.build_unit_recordings" if plan.kind in AUDIO_KINDS
                   else "data.build_unit_text_docs")
        print(f"[{label}] NOTE: {len(plan.units)} work units ({setting}={unit} "
              f"{'recordings' if plan.kind in AUDIO_KINDS else 'documents'} each) for {part[1]} "
              f"parts: {idle} part{'s have' if idle > 1 else ' has'} nothing to do; submit "
              f"--array=0-{len(plan.units) - 1} (or give --part I/{len(plan.units)}), or lower "
              f"{setting}", file=sys.stderr)
    if show_progress:
        print(f"[{label}] {plan.records} records in {len(plan.units)} units"
              + (f", {len(share)} in this part" if part else "") + f"; {len(done)} already done"
              + (f", removed {len(removed)} half-written" if removed else ""), file=sys.stderr)
    worker_devices: dict[str, str | None] = {}
    if pending:
        if target.remote is None:
            remove_merged_files(root)
        try:
            devices = codec_devices(list(data.codec_devices), data.codec_device) if needs_codec else []
        except (RuntimeError, ValueError) as err:
            raise ConfigError(str(err)) from None
        if devices:
            n_workers = min(len(devices), len(pending))
            feeders = feeders_per_device(len(devices), _cpu_count())
        else:
            n_workers = min(data.build_workers if workers is None else workers, len(pending))
            feeders = 0
        spec = WorkerSpec(
            root=str(root), kind=plan.kind, layout=stored["layout"], tokenizer=data.tokenizer,
            doc_types=tuple(data.doc_types), valid_fraction=data.valid_fraction,
            shard_size_limit=data.shard_size_limit, remote=target.remote, devices=tuple(devices),
            feeders=feeders, max_record_audio_bytes=data.max_record_audio_bytes,
            codec=dict(weights=data.mimi_weights, num_codebooks=stored["layout"]["num_codebooks"],
                       device=data.codec_device, chunk_seconds=data.encode_chunk_seconds,
                       batch_size=data.encode_batch_size, seed=data.mimi_seed,
                       weights_sha256=codec_settings.get("weights_sha256")) if needs_codec else None,
            threads=max(1, _cpu_count() // n_workers) if n_workers > 1 else 0)
        done_records = sum(_unit_records(plan.kind, items) for name, items in share if name in done)
        share_records = sum(_unit_records(plan.kind, items) for _, items in share)
        progress = Progress(label, share_records, done_records, enabled=show_progress)
        if n_workers <= 1:
            _run_inline(spec, pending, progress, on_unit_done, len(done), worker_devices)
        else:
            _run_pool(spec, pending, progress, on_unit_done, len(done), n_workers, worker_devices)
        progress.finish()
    marked = _marked_units(target, names)
    missing = [n for n in names if n not in marked]
    if missing:
        if show_progress:
            print(f"[{label}] this part is done; {len(missing)} of {len(names)} units are not built yet "
                  "(other parts): the last part to finish merges the dataset, or run "
                  f"`soda-mega data build --finalize {target.out}`", file=sys.stderr)
        return BuildResult(target.out, plan.kind, {}, len(names), len(done), plan.records,
                           time.monotonic() - t0, finalized=False, part=part_label,
                           units_built=len(pending), units_missing=len(missing),
                           worker_devices=worker_devices)
    result = _finalize(target, stored, len(done), t0)
    result.part, result.units_built, result.worker_devices = part_label, len(pending), worker_devices
    return result


def _unit_records(kind: str, items: list) -> int:
    return len(items) if kind in AUDIO_KINDS else sum(r.num_docs for r in items)


def _run_inline(spec, pending, progress, on_unit_done, completed, worker_devices) -> None:
    init_worker(spec, None)
    set_progress(progress)
    worker_devices[str(os.getpid())] = worker_device()
    try:
        for name, items in pending:
            run_unit(name, items)
            completed += 1
            if on_unit_done:
                on_unit_done(name, completed)
    finally:
        shutdown_worker()


def _run_pool(spec, pending, progress, on_unit_done, completed, n_workers, worker_devices) -> None:
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    slots = ctx.Value("i", 0)
    # A killed build leaves no worker behind: each arms its parent-death signal first.
    pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=spawned_dying_with,
                               initargs=(os.getpid(), INIT_WORKER, spec, reports, slots))

    def drain() -> None:
        while True:
            try:
                msg = reports.get_nowait()
            except queue_mod.Empty:
                return
            if msg[0] == "worker":
                worker_devices[str(msg[1])] = msg[2]
            else:
                progress.advance(*msg[1:])

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
        drain()
    finally:
        reports.close()


# ----------------------------------------------------------------- the merge
def finalize_dataset(out: str | Path, *, staging: str | Path | None = None,
                     show_progress: bool = True) -> BuildResult:
    """Merge a build whose units are all marked (``data build --finalize OUT``), from its
    ``.build/plan.json`` and unit markers alone: no inputs, no codec. ``BuildError`` naming the
    missing units when some part has not finished."""
    t0 = time.monotonic()
    target = BuildTarget(out, staging)
    try:
        stored = _load_stored_plan(target)
        names = [unit_name(i) for i in range(stored["units"])]
        missing = [n for n in names if n not in _marked_units(target, names)]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise BuildError(f"{target.out}: {len(missing)} of {len(names)} units are not built yet ({shown}); "
                             "run (or rerun) the parts that hold them, then --finalize again")
        if target.remote is None:
            remove_merged_files(target.root)
        result = _finalize(target, stored, len(names), t0)
        if show_progress:
            print(f"[data build --finalize] merged {len(names)} units of {target.out}", file=sys.stderr)
        return result
    finally:
        target.close()


def _finalize(target: BuildTarget, stored: dict, resumed: int, t0: float) -> BuildResult:
    root = target.root
    settings = stored["settings"]
    names = [unit_name(i) for i in range(stored["units"])]
    if target.remote is not None:
        target.fetch([marker_rel(n) for n in names])
    markers = {}
    for name in names:
        try:
            markers[name] = json.loads((root / marker_rel(name)).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BuildError(f"{target.out}/{marker_rel(name)} is not valid JSON ({err}); delete it and "
                             "rerun the part that holds the unit") from None
        check_marker(markers[name], name, target.out)
    plan_skips: dict[str, list] = {s: [] for s in SPLITS}
    for s in stored["skipped"]:
        plan_skips[split_of(s["record"], settings["valid_fraction"])].append(s)
    _check_train_not_empty(stored, markers, plan_skips)
    layout = VocabLayout.from_dict(stored["layout"])
    metas = {}
    for split in SPLITS:
        base = {"kind": settings["kind"], "vocab_layout": layout.to_dict(),
                "vocab_fingerprint": layout.fingerprint(), "codec": settings["codec"],
                "tokenizer": settings["tokenizer"],
                "build": {"fingerprint": stored["fingerprint"], "inputs": settings["inputs"],
                          "doc_types": settings["doc_types"],
                          "valid_fraction": settings["valid_fraction"],
                          "split_by": settings.get("split_by")}}
        metas[split] = merge_split(root, split, names, markers, base, plan_skips[split],
                                   check_units=target.remote is None)
    if target.remote is not None:
        for split in SPLITS:
            for name in MERGED_FILES:
                target.publish(f"{split}/{name}")
        for name in names:
            (root / marker_rel(name)).unlink(missing_ok=True)
    skipped = [s for m in metas.values() for s in m["skipped"]]
    return BuildResult(target.out, settings["kind"], metas, len(names), resumed, stored["records"],
                       time.monotonic() - t0, skipped)


def _check_train_not_empty(stored: dict, markers: dict[str, dict], plan_skips: dict[str, list]) -> None:
    """A build without a single training document is a failure, not a dataset (nothing is merged)."""
    docs = {split: sum(m["splits"][split]["num_docs"] for m in markers.values()) for split in SPLITS}
    if docs["train"]:
        return
    skipped = [s for split in SPLITS for s in plan_skips[split]]
    skipped += [s for m in markers.values() for split in SPLITS for s in m["splits"][split]["skipped"]]
    why = f"{stored['records']} records, {len(skipped)} skipped"
    if skipped:
        why += f" (first: {skipped[0]['record']}: {skipped[0]['reason']})"
    if docs["valid"]:
        why += (f"; all {docs['valid']} documents went to the valid split: lower data.valid_fraction "
                f"(now {stored['settings']['valid_fraction']}) or add records")
    raise BuildError(f"the train split is empty: {why}. The finished work units are kept; fix the "
                     "inputs or settings and rerun (with --overwrite: they are a new plan)")


def summary_lines(result: BuildResult) -> list[str]:
    """Human summary of a build, one line per split (or of one unfinished part)."""
    if not result.finalized:
        return [f"built part {result.part} of {result.kind} dataset {result.root} in {result.seconds:.1f} s "
                f"({result.units_built} units built, {result.units_missing} of {result.units} still missing "
                "in other parts: the last part to finish merges the dataset, or run "
                f"`soda-mega data build --finalize {result.root}`)"]
    lines = [f"built {result.kind} dataset {result.root} in {result.seconds:.1f} s "
             f"({result.units} units, {result.units_resumed} reused)"]
    for split, meta in result.splits.items():
        tok = meta["tokens"]
        lines.append(f"  {split:<5} {meta['num_docs']:>7} docs  {tok['total']:>11,} tokens "
                     f"(text {tok['text']:,}, special {tok['special']:,}, semantic {tok['semantic']:,}, "
                     f"acoustic {tok['acoustic']:,})  {meta['audio_hours']:.3f} h audio  "
                     f"skipped {len(meta['skipped'])}")
    if not result.splits["valid"]["num_docs"]:
        lines.append("  NOTE: the valid split is empty: training skips validation of this dataset; raise "
                     "data.valid_fraction or add records to have one")
    return lines


def result_dict(result: BuildResult) -> dict:
    return asdict(result)
