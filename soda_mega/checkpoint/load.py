"""Reading a checkpoint into this process's layout (any TP / PP / DP: weights reshard on load).

RNG states are restored only when the layout is the same (dropout is 0 in SODA's recipe, so
this changes nothing numerically).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from soda_mega.checkpoint.errors import CheckpointError, DamagedCheckpoint
from soda_mega.checkpoint.layout import STATE_FILE, read_state
from soda_mega.checkpoint.manifest import verify
from soda_mega.checkpoint.sharded import model_sharded_state_dict, optimizer_metadata, rank, unwrap, world
from soda_mega.checkpoint.trust import RNG_DIR, RNG_HINT, load_plain, rng_files, vet_checkpoint

#: trainer_state.json fields a resume restores (besides ``step``, which every checkpoint has).
RESUME_FIELDS = ("tokens", "bad_steps", "loader")


def verify_checkpoint(step_dir: Path) -> None:
    """Checksums (a share per rank), then plain data (each rank vets its own RNG file) of
    ``step_dir``; raises :class:`DamagedCheckpoint` or :class:`CheckpointError` naming the
    file. Collective: every rank calls it."""
    verify(step_dir)
    mine = [p for p in rng_files(step_dir) if p.name == f"rank{rank()}.pt"]
    vet_checkpoint(step_dir, STATE_FILE, files=mine)


def load_checkpoint(path: str | os.PathLike, model, optimizer=None, restore_rng: bool = True,
                    verified: bool = False) -> dict:
    """Load weights (and optimizer state) from ``path`` into this layout; returns trainer state.

    The checkpoint is verified first (see :func:`verify_checkpoint`) unless ``verified``."""
    path = Path(path)
    if not verified:
        verify_checkpoint(path)  # nothing is loaded from a file that is damaged or not plain data
    state = read_state(path)
    if optimizer is not None and state.get("weights_only"):
        raise CheckpointError(f"{path} holds weights only (no optimizer state) and cannot be "
                              "resumed; start a new run from it with --training.init_from")
    missing = [k for k in RESUME_FIELDS if optimizer is not None and k not in state]
    if missing:
        raise DamagedCheckpoint(f"{path / STATE_FILE}: has no {missing[0]!r} field, which a resume "
                                "needs; the file is damaged or was replaced")
    chunks = unwrap(model)
    sharded = model_sharded_state_dict(chunks)
    if optimizer is not None:
        # A fresh optimizer has no state to load into: give it zero-filled state first (one
        # step on zero gradients; everything it touches is overwritten by the load).
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
                inner._init_optimizer_states_with_dummy_values()
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=optimizer_metadata())
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - wrapped in their own types
        raise CheckpointError(f"checkpoint {path} does not load into this model: "
                              f"{type(err).__name__}: {str(err).strip()[:600]}") from err
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    rng_file = path / RNG_DIR / f"rank{rank()}.pt"
    if restore_rng and rng_file.is_file():
        rng = load_plain(rng_file, hint=RNG_HINT)
        if rng["world_size"] == world():
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
    return state
