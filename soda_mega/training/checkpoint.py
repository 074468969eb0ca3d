"""Complete-or-absent, reshardable checkpoints with Megatron-core's ``dist_checkpointing``.

Layout of a run's checkpoint folder::

    <dir>/latest                    name of the newest complete checkpoint (replaced atomically)
    <dir>/step_00000100/            dist_checkpointing output: model + optimizer, sharded
    <dir>/step_00000100/trainer_state.json   step, tokens, loader state, schedule, config
    <dir>/step_00000100/rng/rank<r>.pt       this rank's torch RNG state (same layout only)

Every rank writes into ``step_N.tmp``; after a barrier rank 0 adds the trainer state, renames
the folder to ``step_N`` and only then points ``latest`` at it. A kill at any moment leaves
either the previous checkpoint or the new one as ``latest``, never a half-written one.

Model weights and optimizer state are saved by global parameter name in "model space"
(Megatron's ``fully_reshardable`` format for the distributed optimizer: gathered per DP group at save time, sliced per rank at load time), so a checkpoint
loads into another TP / PP / DP layout. RNG states are restored only when the layout is the
same (dropout is 0 in SODA's recipe, so this changes nothing numerically).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from soda_mega.checkpoint.trust import RNG_HINT, load_plain, read_json, vet_checkpoint

LATEST = "latest"
STATE_FILE = "trainer_state.json"
# Distributed-optimizer state in a layout-free form, so checkpoints reshard over TP, PP and DP.
SHARDING = "fully_reshardable"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``root``, or None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing; "
                                "remove the pointer or restore the folder")
    return path


def _optimizer_metadata() -> dict:
    # NOTE: the default fully_reshardable path gathers over the NCCL data-parallel group with
    # CUDA tensors; on CPU the memory-efficient variant gathers over Megatron's gloo group.
    return {"distrib_optim_sharding_type": SHARDING,
            "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


def _model_sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _unwrap(model) -> list:
    return [getattr(m, "module", m) for m in model]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(root: str | os.PathLike, step: int, model, optimizer, trainer_state: dict,
                    keep_last: int = 3) -> Path:
    """Save model, optimizer, RNG and ``trainer_state`` (JSON-able) as ``step_<step>``.

    ``optimizer=None`` writes a weights-only checkpoint (``soda-mega import hf``): it can be
    evaluated, exported, or start a run through ``training.init_from``, but not resumed.
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of a save that was killed
        tmp.mkdir()
    _barrier()
    chunks = _unwrap(model)
    sharded = _model_sharded_state_dict(chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=False, metadata=_optimizer_metadata())
    dist_checkpointing.save(sharded, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1},
               tmp / "rng" / f"rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        _write_atomic(tmp / STATE_FILE, json.dumps(trainer_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, model, optimizer=None, restore_rng: bool = True) -> dict:
    """Load weights (and optimizer state) from ``path`` into this layout; returns trainer state."""
    path = Path(path)
    vet_checkpoint(path, STATE_FILE)  # nothing is loaded from a file that is not plain data
    state = read_json(path / STATE_FILE)
    if optimizer is not None and state.get("weights_only"):
        raise ValueError(f"{path} holds weights only (no optimizer state) and cannot be resumed; "
                         "start a new run from it with --training.init_from")
    chunks = _unwrap(model)
    sharded = _model_sharded_state_dict(chunks)
    if optimizer is not None:
        # A fresh optimizer has no state to load into: give it zero-filled state first (one
        # step on zero gradients; everything it touches is overwritten by the load).
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
                inner._init_optimizer_states_with_dummy_values()
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=_optimizer_metadata())
    loaded = dist_checkpointing.load(sharded, str(path))
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    rng_file = path / "rng" / f"rank{_rank()}.pt"
    if not restore_rng:
        return state
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rng_file.is_file():
        rng = load_plain(rng_file, hint=RNG_HINT)
        if rng["world_size"] == world:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
    return state
