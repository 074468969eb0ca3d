"""Weights & Biases output for the metric records (optional: ``run.wandb_project``).

The logging rank sends W&B the same records that go to TensorBoard and ``metrics.jsonl``:
every numeric value of a record of kind ``train``, ``valid`` or ``telemetry`` as
``<kind>/<key>``, against the training step. The step is logged as the metric ``step`` (the
x-axis of every chart) rather than as W&B's own monotonic ``_step``, so a run that resumes from
a checkpoint older than its last logged step keeps logging instead of having W&B drop the
repeated steps.

The W&B run id is kept in ``run.dir/wandb.json``: a run that resumes from a checkpoint
continues the same W&B run; a fresh start (step 0) makes a new one. ``WANDB_MODE=offline``
(read by wandb itself) writes everything under ``run.dir/wandb/`` with no network; ``wandb
sync`` uploads it later.

W&B never stops training: without the package, or when wandb fails to start or to log, a
one-line notice says so and the run goes on with TensorBoard and JSONL.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
from pathlib import Path
from typing import Any

ID_FILE = "wandb.json"


def _notice(text: str) -> None:
    print(f"soda-mega: W&B logging is off: {text}", file=sys.stderr, flush=True)


def _read_id(path: Path) -> str | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    run_id = saved.get("id") if isinstance(saved, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def _write_id(path: Path, run_id: str, project: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"id": run_id, "project": project}) + "\n")
    os.replace(tmp, path)


def new_run_id() -> str:
    """A fresh W&B run id: 8 random lowercase letters and digits, as W&B makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers as ``{"<kind>/<key>": value}`` (what TensorBoard gets too)."""
    kind = record.get("kind", "train")
    out = {}
    for key, value in record.items():
        if key in ("step", "kind") or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return out


class WandbLogger:
    """One W&B run per training run folder; :meth:`log` takes the sink's metric records."""

    def __init__(self, run: Any) -> None:
        self._run = run

    @classmethod
    def open(cls, run_dir: Path, run_cfg, config: dict, resumed: bool) -> WandbLogger | None:
        """Start (or, when ``resumed``, continue) the W&B run of ``run_dir``; None when off."""
        project = run_cfg.wandb_project
        if not project:
            return None
        try:
            import wandb
        except ImportError:
            _notice("run.wandb_project is set but the `wandb` package is not installed "
                    "(pip install wandb)")
            return None
        id_path = Path(run_dir) / ID_FILE
        run_id = _read_id(id_path) if resumed else None
        if run_id is None:
            run_id = new_run_id()
        try:
            run = wandb.init(project=project, entity=run_cfg.wandb_entity or None,
                             name=run_cfg.wandb_name or None, tags=list(run_cfg.wandb_tags) or None,
                             id=run_id, resume="allow", dir=str(run_dir), config=config)
            run.define_metric("step")
            # wandb reports imports of some modules from hooks that fail in forked children
            # (loader workers): drop them, they only feed W&B's usage telemetry.
            unhook = getattr(type(run), "_unregister_telemetry_import_hooks", None)
            if unhook is not None:
                unhook(run_id)
            run.define_metric("*", step_metric="step")
        except Exception as err:  # noqa: BLE001 - credentials, network, service: never fatal
            _notice(f"wandb.init failed: {err}")
            return None
        _write_id(id_path, run_id, project)
        mode = os.environ.get("WANDB_MODE", "online")
        print(f"soda-mega: W&B run {run_id} in project {project!r} ({mode}"
              f"{', continued' if resumed else ''})", flush=True)
        return cls(run)

    def log(self, record: dict) -> None:
        if self._run is None:
            return
        values = scalars(record)
        if not values:
            return
        try:
            self._run.log({"step": record["step"], **values})
        except Exception as err:  # noqa: BLE001 - a failing dashboard must not stop training
            _notice(f"wandb.log failed: {err}")
            self.close()

    def close(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish()
            except Exception as err:  # noqa: BLE001
                _notice(f"wandb.finish failed: {err}")
