"""Which checkpoint a run continues from, whether it is this run's, and starting over.

- :func:`find_resume_checkpoint`: the checkpoint ``latest`` names, verified (checksums, plain
  data); when it is damaged, missing, or ``latest`` holds garbage, the newest older intact
  checkpoint, saying so loudly and pointing ``latest`` at it. No intact checkpoint at all in
  a folder that holds some is an error, never a silent restart from step 0.
- :func:`check_resumable`: refuses a checkpoint of another model, vocabulary, batch or seed,
  and warns when the precision changes.
- :func:`start_over`: ``run.resume=false`` in a folder that holds checkpoints is refused
  unless ``run.overwrite=true``, which moves the old checkpoints, metrics and TensorBoard
  files to ``run.dir/replaced/<time>/`` (nothing is deleted).

All functions run on every rank (they verify collectively, or end with a barrier).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from soda_mega.checkpoint.errors import CheckpointError, DamagedCheckpoint
from soda_mega.checkpoint.layout import LATEST, STATE_FILE, STEP_DIR
from soda_mega.checkpoint.load import verify_checkpoint
from soda_mega.checkpoint.sharded import barrier, rank
from soda_mega.checkpoint.trust import read_json
from soda_mega.utils.files import not_regular

REPLACED = "replaced"
# What a run folder holds of one run's history; start_over moves these aside together.
RUN_HISTORY = ("checkpoints", "metrics.jsonl", "tensorboard")
START_OVER = "--run.resume=false --run.overwrite=true"


def warn(text: str) -> None:
    if rank() == 0:
        print(f"soda-mega: WARNING: {text}", file=sys.stderr, flush=True)


def step_folders(root: Path) -> list[Path]:
    """The ``step_N`` folders of ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()),
                  key=lambda p: p.name, reverse=True)


def has_checkpoints(root: Path) -> bool:
    return bool(step_folders(root)) or (Path(root) / LATEST).exists()


def pointer_target(root: Path) -> tuple[Path | None, str | None]:
    """(folder ``latest`` names, or None; a sentence on what is wrong with it, or None)."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None, None
    if problem := not_regular(pointer):  # a FIFO would block the read until the step timeout
        return None, f"{pointer} {problem}"
    try:
        text = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    except OSError as err:
        return None, f"{pointer} is unreadable ({err})"
    if not STEP_DIR.match(text):
        return None, f"{pointer} holds {text[:60]!r}, not the name of a checkpoint"
    if not (Path(root) / text).is_dir():
        return None, f"{pointer} names {text}, which does not exist"
    return Path(root) / text, None


def find_resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint a run in ``root`` continues from (verified), or None for a fresh start."""
    root = Path(root)
    start, problem = pointer_target(root)
    folders = step_folders(root)
    if start is not None:
        candidates = [start] + [p for p in folders if p.name < start.name]
    else:
        candidates = folders
        if problem and candidates:
            warn(f"{problem}; looking for the newest intact checkpoint instead")
    if not candidates:
        if problem:
            raise CheckpointError(f"{problem}, and {root} holds no checkpoint folder: restore it, "
                                  f"or start over with {START_OVER}")
        return None
    failures = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
        except DamagedCheckpoint as err:
            failures.append(str(err))
            warn(f"{err}; skipping it")
            continue
        if failures or candidate != start:
            skipped = f" ({len(failures)} damaged one(s) skipped)" if failures else ""
            warn(f"resuming from {candidate.name}, the newest intact checkpoint{skipped}; "
                 f"'latest' now names it")
            if rank() == 0:
                _point_latest(root, candidate)
            barrier()
        return candidate
    raise CheckpointError(f"no intact checkpoint to resume in {root}: " + "; ".join(failures)
                          + f". Restore a checkpoint, or start over with {START_OVER}")


def _point_latest(root: Path, step_dir: Path) -> None:
    tmp = root / f"{LATEST}.tmp{os.getpid()}"
    tmp.write_text(step_dir.name)
    os.replace(tmp, root / LATEST)


def check_resumable(saved: dict, current: dict, path: Path) -> None:
    """Refuse a checkpoint of another model, vocabulary, batch or seed (``saved`` and
    ``current`` are config dicts); warn when the precision changes."""
    diffs = []
    for section in ("model", "vocab"):
        for key, value in saved[section].items():
            if current[section].get(key) != value:
                diffs.append(f"{section}.{key}: checkpoint {value!r} != config "
                             f"{current[section].get(key)!r}")
    for key in ("global_batch_size", "seed"):
        if saved["training"][key] != current["training"][key]:
            diffs.append(f"training.{key}: checkpoint {saved['training'][key]!r} != config "
                         f"{current['training'][key]!r}")
    if diffs:
        raise CheckpointError(
            f"the checkpoint {path} belongs to another run: " + "; ".join(diffs)
            + f" (use another run.dir, or {START_OVER} to move the old checkpoints aside and "
              "start over)")
    before, now = saved["training"].get("precision"), current["training"].get("precision")
    if before is not None and before != now:
        warn(f"training.precision changes from {before} (checkpoint {path.name}) to {now}: "
             f"weights and optimizer state are converted on load, and the loss trace will not "
             f"be the one an uninterrupted {before} run gives")


def start_over(run_dir: Path, ckpt_dir: Path, resume: bool, overwrite: bool) -> None:
    """Before a run starts: refuse ``run.resume=false`` over existing checkpoints unless
    ``run.overwrite``, which moves the old run's history aside (rank 0; all ranks call it)."""
    if overwrite and resume:
        raise CheckpointError("run.overwrite=true starts the run over: give it together with "
                              "--run.resume=false")
    holds = has_checkpoints(ckpt_dir)
    barrier()  # every rank has looked before rank 0 moves anything
    if resume or not holds:
        return
    if not overwrite:
        newest = step_folders(ckpt_dir)
        raise CheckpointError(
            f"run.resume=false, but {ckpt_dir} holds checkpoints"
            + (f" (newest {newest[0].name})" if newest else "")
            + ": a new run there would mix with them. Use a new run.dir, or add "
              "--run.overwrite=true to move them aside (nothing is deleted) and start over")
    dest = Path(run_dir) / REPLACED / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if rank() == 0:
        dest.mkdir(parents=True, exist_ok=True)
        moved = []
        for name in RUN_HISTORY:
            if (Path(run_dir) / name).exists():
                os.replace(Path(run_dir) / name, dest / name)
                moved.append(name)
        warn(f"run.overwrite=true: moved {', '.join(moved)} of the previous run to {dest}; "
             f"starting over at step 0")
    barrier()


def chain(root: Path, newest: Path) -> list[Path]:
    """``newest`` and the checkpoints it descends from (newest first), by the ``previous`` each
    checkpoint records (when that is gone or not recorded: the next older folder)."""
    out, current = [newest], newest
    older = {p.name: p for p in step_folders(root)}
    while True:
        try:
            state = read_json(current / STATE_FILE)
        except CheckpointError:
            state = {}
        name = state.get("previous", "")
        if name is None:  # the first checkpoint of a run
            return out
        prev = older.get(name) if isinstance(name, str) else None
        if prev is None:
            # NOTE: no record (older checkpoints) or pruned already: the next older folder.
            lower = [n for n in older if n < current.name]
            prev = older[max(lower)] if lower else None
        if prev is None or prev in out or prev.name >= current.name:
            return out
        out.append(prev)
        current = prev
