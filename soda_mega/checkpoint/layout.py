"""Where checkpoints live and what a path stands for.

Layout of a run's checkpoint folder::

    <dir>/latest                    name of the newest complete checkpoint (replaced atomically)
    <dir>/step_00000100/            dist_checkpointing output: model + optimizer, sharded
    <dir>/step_00000100/trainer_state.json   step, tokens, loader state, schedule, config
    <dir>/step_00000100/rng/rank<r>.pt       this rank's torch RNG state (same layout only)

Commands accept a ``step_N`` folder, a ``checkpoints/`` folder (its ``latest``) or a run folder
(its ``checkpoints/latest``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from soda_mega.checkpoint.contents import check_model_tensors
from soda_mega.checkpoint.errors import CheckpointError
from soda_mega.checkpoint.trust import check_state, read_json
from soda_mega.config.fields import ConfigError
from soda_mega.config.loader import apply_mapping
from soda_mega.config.places import ignored_notice, without_node_settings
from soda_mega.config.schema import SodaConfig
from soda_mega.utils.files import not_regular

LATEST = "latest"
STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``root``, or None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if problem := not_regular(pointer):
        raise CheckpointError(f"{pointer} {problem}; refused (a FIFO would block the read): give "
                              f"a step_N folder instead")
    if not pointer.is_file():
        return None
    name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    path = root / name
    if not STEP_DIR.match(name) or not (path / STATE_FILE).is_file():
        others = sorted((p.name for p in root.iterdir() if STEP_DIR.match(p.name)), reverse=True)
        raise CheckpointError(
            f"{pointer} names {name[:60]!r}, which is not a complete checkpoint; give a step_N "
            f"folder instead" + (f" (here: {', '.join(others[:5])})" if others else "")
            + " (a training run resumes from the newest intact one by itself)")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The ``step_N`` folder that ``path`` (step, checkpoints or run folder) stands for."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or folder")
    if (path / STATE_FILE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root) if (root / LATEST).exists() else None
        if found is not None:
            return found
    raise CheckpointError(
        f"checkpoint {path}: not a soda-mega checkpoint (expected a step_N folder with "
        f"{STATE_FILE}, a checkpoints/ folder with '{LATEST}', or a run folder)")


def read_state(step: str | os.PathLike) -> dict:
    """``trainer_state.json`` of the ``step_N`` folder ``step``, its fields checked."""
    path = Path(step) / STATE_FILE
    return check_state(read_json(path), path)


def checkpoint_state(path: str | os.PathLike) -> dict:
    """``trainer_state.json`` of the checkpoint ``path`` stands for."""
    return read_state(resolve_checkpoint(path))


def checkpoint_config(path: str | os.PathLike) -> SodaConfig:
    """The resolved configuration the checkpoint was written with, once its tensors are known
    to be that model's (:func:`~soda_mega.checkpoint.contents.check_model_tensors`: a model
    is built from what this returns), less the settings that name places of the machine that
    wrote it (:mod:`soda_mega.config.places`: the cache folder and limit, the run folder),
    which take their default values; the caller's own overrides then decide them. One line
    (once per checkpoint and process) names a cache setting left out."""
    step = resolve_checkpoint(path)
    state_file = step / STATE_FILE
    saved, dropped = without_node_settings(read_state(step)["config"])
    cfg = SodaConfig()
    try:
        apply_mapping(cfg, saved, str(state_file))
        cfg.validate()
    except ConfigError as err:
        raise CheckpointError(f"{state_file}: its configuration does not load: {err}") from None
    check_model_tensors(step, cfg, STATE_FILE)
    notice = ignored_notice(f"checkpoint {state_file}", dropped)
    if notice and str(state_file) not in _NOTICED and int(os.environ.get("RANK", "0")) == 0:
        _NOTICED.add(str(state_file))
        print(f"soda-mega: {notice}", file=sys.stderr, flush=True)
    return cfg


_NOTICED: set[str] = set()  # trainer_state.json files whose notice this process printed
