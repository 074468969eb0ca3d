"""The results CSV: one row per finished run, written by ``scaling sweep``, read by ``scaling fit``.

Required columns (any results file, also one made by hand or by another stack):

* ``budget``: the run's training-FLOP budget C (its IsoFLOP curve);
* ``n_params``: N, SODA's size label (non-embedding + output layer);
* ``tokens``: D, training tokens;
* ``valid_loss``: held-out NLL per token (nats) at the end of the run.

``scaling sweep`` adds ``run_id``, the shape, ``flops_exact`` / ``flops_6n``, ``vocab_size``,
``seq_length``, the step of the validation and where the run lives. :func:`load_results`
checks every value and fails with a message naming the file, the line and the column (or the
budget) at fault.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REQUIRED = ("budget", "n_params", "tokens", "valid_loss")

#: Columns ``scaling sweep`` writes, in order.
COLUMNS = ("run_id", "budget", "flops_mode", "hidden_size", "num_layers", "n_params", "n_params_total",
           "tokens", "steps", "flops_exact", "flops_6n", "valid_loss", "valid_step", "vocab_size",
           "seq_length", "seconds", "finished_utc", "run_dir")


class ResultsError(ValueError):
    """A results file cannot be fitted; the message names the file and the fault."""


@dataclass(frozen=True)
class Results:
    """Checked results, one array entry per run, sorted by budget then N."""

    path: Path
    budget: np.ndarray
    n_params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    run_id: list[str]
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def budgets(self) -> np.ndarray:
        """The distinct budgets, ascending."""
        return np.unique(self.budget)

    def of_budget(self, budget: float) -> np.ndarray:
        """Indices of the runs of one budget."""
        return np.flatnonzero(self.budget == budget)

    def __len__(self) -> int:
        return len(self.loss)


def _number(path: Path, line: int, row: dict, column: str, who: str, positive: bool) -> float:
    text = (row.get(column) or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise ResultsError(f"{path} line {line} ({who}): column {column!r} holds {text!r}, not a number") from None
    if not math.isfinite(value):
        raise ResultsError(f"{path} line {line} ({who}): column {column!r} is {text!r}, not finite; "
                           "rerun that run or remove the line")
    if positive and value <= 0:
        raise ResultsError(f"{path} line {line} ({who}): column {column!r} must be > 0, got {text!r}")
    return value


def load_results(path: str | Path, min_points_per_budget: int = 3, min_budgets: int = 2) -> Results:
    """Read and check a results CSV (columns in the module docstring).

    Fails on: a missing file, missing columns, a value that is not a finite (positive) number,
    a run id that appears twice, a budget with fewer than ``min_points_per_budget`` distinct
    model sizes, fewer than ``min_budgets`` budgets.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such results file (`soda-mega scaling sweep` writes "
                           "results.csv next to the manifest)")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ResultsError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; a results "
                               f"file needs {', '.join(REQUIRED)} (has: {', '.join(header) or 'nothing'})")
        rows = list(reader)
    if not rows:
        raise ResultsError(f"{path}: has a header but no runs")
    optional = [c for c in ("flops_exact", "flops_6n", "vocab_size", "seq_length", "hidden_size",
                            "seconds") if c in header]
    values: dict[str, list[float]] = {c: [] for c in (*REQUIRED, *optional)}
    ids: list[str] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        run_id = (row.get("run_id") or "").strip() or f"row {line - 1}"
        if run_id in seen:
            raise ResultsError(f"{path}: run {run_id!r} appears on lines {seen[run_id]} and {line}; "
                               "keep one")
        seen[run_id] = line
        ids.append(run_id)
        for column in REQUIRED:
            values[column].append(_number(path, line, row, column, run_id, positive=True))
        for column in optional:
            text = (row.get(column) or "").strip()
            values[column].append(_number(path, line, row, column, run_id, positive=True) if text
                                  else math.nan)
    arrays = {c: np.asarray(v, dtype=float) for c, v in values.items()}
    order = np.lexsort((arrays["n_params"], arrays["budget"]))
    arrays = {c: a[order] for c, a in arrays.items()}
    ids = [ids[i] for i in order]
    budgets = np.unique(arrays["budget"])
    for budget in budgets:
        sizes = np.unique(arrays["n_params"][arrays["budget"] == budget])
        if len(sizes) < min_points_per_budget:
            raise ResultsError(
                f"{path}: budget {budget:.3g} has {len(sizes)} distinct model size(s); a parabola "
                f"needs at least {min_points_per_budget} (add runs, or remove that budget's rows)")
    if len(budgets) < min_budgets:
        raise ResultsError(f"{path}: {len(budgets)} budget(s); a power law over budgets needs at "
                           f"least {min_budgets}")
    extra = {c: arrays[c] for c in optional}
    return Results(path=path, budget=arrays["budget"], n_params=arrays["n_params"],
                   tokens=arrays["tokens"], loss=arrays["valid_loss"], run_id=ids, extra=extra)
