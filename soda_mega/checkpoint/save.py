"""Writing a checkpoint: complete or absent, published by an atomic ``latest`` pointer.

Every rank writes into ``step_N.tmp``; after a barrier rank 0 adds the trainer state, renames
the folder to ``step_N`` and only then points ``latest`` at it. A kill at any moment leaves
either the previous checkpoint or the new one as ``latest``, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from soda_mega.checkpoint.layout import LATEST, STATE_FILE, STEP_DIR, step_dir
from soda_mega.checkpoint.sharded import (barrier, model_sharded_state_dict, optimizer_metadata,
                                          rank, unwrap, world)
from soda_mega.checkpoint.trust import RNG_DIR


def write_atomic(path: Path, text: str) -> None:
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
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of a save that was killed
        tmp.mkdir()
    barrier()
    sharded = model_sharded_state_dict(unwrap(model))
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=False, metadata=optimizer_metadata())
    dist_checkpointing.save(sharded, str(tmp))
    (tmp / RNG_DIR).mkdir(exist_ok=True)
    # Plain tensors and values only: read back with torch.load(weights_only=True).
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "world_size": world()},
               tmp / RNG_DIR / f"rank{rank()}.pt")
    barrier()
    if rank() == 0:
        write_atomic(tmp / STATE_FILE, json.dumps(trainer_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(root / LATEST, final.name)
        _prune(root, keep_last)
    barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
