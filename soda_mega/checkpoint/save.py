"""Writing a checkpoint: complete or absent, checksummed, published by an atomic ``latest``.

Every rank writes into ``step_N.tmp``; rank 0 adds the trainer state, all ranks hash a share
of the files into ``manifest.json``, then rank 0 renames the folder to ``step_N`` and only
then points ``latest`` at it. A kill at any moment leaves either the previous checkpoint or
the new one as ``latest``, never a half-written one. A write that fails on any rank (a full
disk, a file size limit) fails the save on every rank with one message, and the ``.tmp``
folder is removed.

Each checkpoint records the one ``latest`` named before it (``previous``): pruning walks this
chain from the new checkpoint and keeps the newest ``keep_last`` intact ones of it, never the
one just written, plus the last one saved before a run of non-finite steps. A folder in the
way of the new one (left by an abandoned timeline, e.g. after a fallback) is moved to
``replaced/``, not deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

# NOTE: a BaseException, not an Exception: torch's way of failing a distributed save.
from torch.distributed.checkpoint.api import CheckpointException

from soda_mega.checkpoint.errors import CheckpointError
from soda_mega.checkpoint.layout import LATEST, STATE_FILE, step_dir
from soda_mega.checkpoint.manifest import write_manifest
from soda_mega.checkpoint.optimizer_views import optimizer_state_views
from soda_mega.checkpoint.resume import REPLACED, chain, pointer_target
from soda_mega.checkpoint.sharded import barrier, model_sharded_state_dict, optimizer_metadata, rank, unwrap, world
from soda_mega.checkpoint.trust import RNG_DIR, read_json
from soda_mega.utils.lifetime import forks_finish_their_work

_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_FULL_WORDS = ("No space left", "File too large", "Disk quota", "unexpected pos")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def writer_results(results):
    """Megatron's file writer hands its results over ``results`` in this block.

    NOTE: by default that queue lives in a *spawned* ``multiprocessing`` manager: a second
    Python process (~290 MB) that outlives a killed trainer for minutes. A synchronous save puts
    and gets in this process only (a plain ``queue.Queue``); an asynchronous one reads a pipe
    from its background process (:class:`~soda_mega.checkpoint.async_save.ChildPipe`)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = results
    try:
        yield results
    finally:
        filesystem_async._results_queue = previous


def _is_disk_full(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL:
            return True
        if any(word in str(err) for word in _FULL_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


def _summary(text: str) -> str:
    """The line of an error (often a remote traceback) that says what happened."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    telling = [line for line in lines if any(word in line for word in _FULL_WORDS)]
    return (telling or lines[-1:] or [text])[0][:400]


def _agree(error: BaseException | None) -> list[tuple[int, str, bool]]:
    """Every rank's failure of the last phase, on every rank."""
    local = [] if error is None else [(rank(), f"{type(error).__name__}: {error}",
                                       _is_disk_full(error))]
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def _fail(failures: list, tmp: Path, final: Path) -> None:
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    where = tmp.parent
    free = shutil.disk_usage(where).free if where.exists() else 0
    first = _summary(failures[0][1])
    if any(full for _, _, full in failures):
        raise CheckpointError(
            f"saving {final.name} failed: the disk is full (or a file size limit was hit) while "
            f"writing {tmp} ({first}); {free / 2**20:,.0f} MiB free there now. The partial "
            f"{tmp.name} was removed and the previous checkpoint is untouched: free space (or "
            f"lower run.keep_checkpoints), then resume")
    raise CheckpointError(f"saving {final.name} failed on rank {failures[0][0]}: {first}; the "
                          f"partial {tmp.name} was removed and the previous checkpoint is untouched")


def begin(root: Path, step: int) -> tuple[Path, Path]:
    """``(step_N.tmp, step_N)`` of a new save; rank 0 makes the empty ``.tmp`` (collective)."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of a save that was killed
        tmp.mkdir()
    barrier()
    return tmp, final


def sharded_state(model, optimizer) -> dict:
    sharded = model_sharded_state_dict(unwrap(model))
    if optimizer is not None:
        with optimizer_state_views(optimizer):
            sharded["optimizer"] = _without_empty_param_state(optimizer.sharded_state_dict(
                sharded, is_loading=False, metadata=optimizer_metadata()))
    return sharded


def _without_empty_param_state(state):
    """NOTE: with the memory-efficient fully-reshardable format (CPU, sharded.optimizer_metadata)
    the distributed optimizer gathers its state on DP rank 0 and sets ``param_state`` to None
    on the other DP ranks. That None stays in their *common* state dict, which Megatron
    compares with rank 0's at every save and warns about ("Rank 1 common state dict differs
    from rank 0 ... ('optimizer', 'param_state')"). Only rank 0's common state is written, so
    the empty entry is dropped (here and in chained optimizers' sub-dicts)."""
    if isinstance(state, dict):
        return {k: _without_empty_param_state(v) for k, v in state.items()
                if not (k == "param_state" and v is None)}
    return state


def write_small_files(root: Path, tmp: Path, trainer_state: dict) -> None:
    """This rank's RNG states; on rank 0 the trainer state, with the ``latest`` before it."""
    (tmp / RNG_DIR).mkdir(exist_ok=True)
    # Plain tensors and values only: read back with torch.load(weights_only=True).
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "world_size": world()},
               tmp / RNG_DIR / f"rank{rank()}.pt")
    if rank() == 0:
        previous, _ = pointer_target(root)
        state = {**trainer_state, "previous": previous.name if previous else None}
        write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1))


def check_agreed(error: BaseException | None, tmp: Path, final: Path) -> None:
    """Collective: when any rank failed (``error``), remove ``tmp`` and raise on every rank."""
    failures = _agree(error)
    if failures:
        _fail(failures, tmp, final)


def publish(root: Path, tmp: Path, final: Path, keep_last: int,
            known: dict[str, tuple[int, str]] | None = None) -> Path:
    """Collective: hash ``tmp`` into its manifest (``known``: files some rank hashed already),
    rename it to ``final``, point ``latest`` at it, prune. Raises on every rank on failure."""
    error = None
    try:
        write_manifest(tmp, known)
    except OSError as err:
        error = err
    check_agreed(error, tmp, final)
    if rank() == 0:
        try:
            if final.exists():
                _move_aside(root, final)
            os.replace(tmp, final)
            write_atomic(root / LATEST, final.name)
            prune(root, final, keep_last)
        except OSError as err:
            error = err
    failures = _agree(error)  # also the barrier that keeps ranks together until published
    if failures:
        full = " (the disk is full)" if failures[0][2] else ""
        raise CheckpointError(f"publishing {final} failed{full}: {_summary(failures[0][1])}; "
                              f"'latest' in {root} still names the checkpoint it named before")
    return final


def save_checkpoint(root: str | os.PathLike, step: int, model, optimizer, trainer_state: dict,
                    keep_last: int = 3, writer_init=None) -> Path:
    """Save model, optimizer, RNG and ``trainer_state`` (JSON-able) as ``step_<step>``, now
    (:class:`~soda_mega.checkpoint.async_save.AsyncSaver` saves in the background).

    ``optimizer=None`` writes a weights-only checkpoint (``soda-mega import hf``): it can be
    evaluated, exported, or start a run through ``training.init_from``, but not resumed.
    ``writer_init(index)``: called first in every process the save forks to write (tests' fault
    injection; :func:`soda_mega.utils.lifetime.forks_finish_their_work`).
    """
    root = Path(root)
    tmp, final = begin(root, step)
    error = None
    try:
        sharded = sharded_state(model, optimizer)
        # NOTE: the writer processes Megatron forks ignore the stop signals that torchrun and
        # SLURM send to the whole process group: killed, they never report and this rank waits
        # for them forever. The signal still reaches this process, which saves and stops.
        with forks_finish_their_work(writer_init), writer_results(queue.Queue()):
            dist_checkpointing.save(sharded, str(tmp))
        write_small_files(root, tmp, trainer_state)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - reported on every rank by _fail
        error = err
    check_agreed(error, tmp, final)
    return publish(root, tmp, final, keep_last)


def _move_aside(root: Path, folder: Path) -> None:
    dest = root / REPLACED / f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    dest.parent.mkdir(exist_ok=True)
    os.replace(folder, dest)
    print(f"soda-mega: WARNING: {folder} was in the way of the new checkpoint of that step "
          f"(not on the chain 'latest' names); moved it to {dest}", file=sys.stderr, flush=True)


def _intact(folder: Path) -> bool:
    """Cheap check for pruning: a manifest whose files are all there with their sizes."""
    from soda_mega.checkpoint.manifest import read_manifest

    try:
        manifest = read_manifest(folder)
    except CheckpointError:  # damaged, or refused (names files outside the folder)
        return False
    if manifest is None:
        return (folder / STATE_FILE).is_file()
    return all((folder / n).is_file() and (folder / n).stat().st_size == e["size"]
               for n, e in manifest["files"].items())


def _bad_steps(folder: Path) -> int:
    try:
        return int(read_json(folder / STATE_FILE).get("bad_steps") or 0)
    except (CheckpointError, TypeError, ValueError):
        return 0


def prune(root: Path, newest: Path, keep_last: int) -> list[Path]:
    """Delete checkpoints of ``newest``'s chain beyond the newest ``keep_last`` intact ones
    (``newest`` always kept); keep the last one before a run of non-finite steps. Returns the
    folders removed. Folders off the chain are left alone."""
    members = chain(root, newest)
    keep, kept = {newest}, 1
    for folder in members[1:]:
        if kept < keep_last and _intact(folder):
            keep.add(folder)
            kept += 1
    if _bad_steps(newest) > 0:
        # NOTE: a diverging run keeps saving; its last checkpoint with no skipped steps
        # pending is the one "resume from an earlier checkpoint" needs.
        good = next((f for f in members if _bad_steps(f) == 0), None)
        if good is not None:
            keep.add(good)
    removed = [f for f in members if f not in keep]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed
