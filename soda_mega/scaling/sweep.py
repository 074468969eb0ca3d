"""Run a manifest's IsoFLOP runs through ``soda-mega train`` and record each held-out NLL.

Launchers:

* ``local``: one run after another, each ``python -m soda_mega.cli train --config F`` in a
  subprocess on this machine;
* ``torchrun``: the same under ``python -m torch.distributed.run --standalone
  --nproc-per-node N`` (one node, N processes);
* ``slurm``: a job-array script, one array task per run, each task running
  ``soda-mega scaling sweep MANIFEST --index $SLURM_ARRAY_TASK_ID --launcher torchrun``, so the
  skip / record logic below is the same everywhere; submitted with ``sbatch`` (or printed).

Every run gets ``--run.dir=<manifest folder>/<run_dir>`` and the extra ``--section.key=value``
overrides (e.g. ``--data.train=[...]``); its output goes to ``<run dir>/train.log``. When the
process exits 0, the last ``valid`` record of ``<run dir>/metrics.jsonl`` must be at the run's
final step; its ``valid_loss`` is appended to the results CSV (:mod:`.results`) as one line,
under an exclusive ``flock``, with a single ``O_APPEND`` write. A run already in the results
file is skipped, so relaunching the sweep resumes it (and the trainer itself resumes a run cut
short from its newest checkpoint). A failed run is reported with its log path; the others go on.
"""

from __future__ import annotations

import csv
import datetime as _dt
import fcntl
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from soda_mega.config import ConfigError, load_config
from soda_mega.config.places import ignored_notice, node_setting_overrides, node_settings_of
from soda_mega.scaling.manifest import Manifest, ManifestRun
from soda_mega.scaling.results import COLUMNS
from soda_mega.utils.shell import UnsafeValueError, plain_name, sbatch_path, slurm_time

LAUNCHERS = ("local", "torchrun", "slurm")

#: ``runner(argv, log_path, env) -> exit code``; tests inject a fake one.
Runner = Callable[[Sequence[str], Path, dict], int]


def subprocess_runner(argv: Sequence[str], log_path: Path, env: dict) -> int:
    """Run ``argv`` with stdout and stderr appended to ``log_path``; the exit code."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"\n# {_now()} $ {shlex.join(argv)}\n")
        log.flush()
        return subprocess.run(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def train_command(manifest: Manifest, run: ManifestRun, launcher: str = "local", nproc: int = 1,
                  overrides: Iterable[str] = (), python: str = sys.executable,
                  master_port: int | None = None) -> list[str]:
    """The command line that trains ``run`` (``local`` or ``torchrun``)."""
    if launcher not in ("local", "torchrun"):
        raise ValueError(f"launcher {launcher!r} starts no process by itself; use local or torchrun")
    # NOTE: the run's config file comes with the manifest, maybe from elsewhere: the settings
    # that name places of this machine (the data cache, the run folder) are pinned before the
    # user's own overrides, which still win (config.places).
    train = ["-m", "soda_mega.cli", "train", "--config", str(manifest.config_path(run).resolve()),
             *node_setting_overrides(skip=("run.dir",)),
             f"--run.dir={manifest.run_dir(run).resolve()}", *overrides]
    if launcher == "local":
        return [python, *train]
    port = [] if master_port is None else ["--master-port", str(master_port)]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            *port, *train]


def ignored_settings_notice(manifest: Manifest, run: ManifestRun,
                            overrides: Iterable[str] = ()) -> str | None:
    """One line naming the settings of ``run``'s config file that name places of this machine
    and that ``overrides`` (the user's) do not set (not used: :func:`train_command` pins them),
    or None when there are none. A config that does not load says nothing here: the run's own
    ``train`` reports it."""
    path = manifest.config_path(run)
    try:
        found = node_settings_of(load_config(path))
    except (ConfigError, OSError):
        return None
    given = {o.lstrip("-").split("=", 1)[0] for o in overrides}
    return ignored_notice(f"scaling sweep: {path}",
                          {k: v for k, v in found.items() if k not in given})


# ----------------------------------------------------------------------------- results file
def recorded_runs(results_path: Path) -> set[str]:
    """Run ids already in the results CSV (empty when it does not exist)."""
    if not results_path.is_file():
        return set()
    with results_path.open(newline="") as handle:
        return {row["run_id"] for row in csv.DictReader(handle) if row.get("run_id")}


def append_result(results_path: Path, row: dict) -> None:
    """Append one row (header first if the file is new), atomically w.r.t. concurrent writers.

    The file is locked with ``flock`` and the row goes out in one ``write`` on an ``O_APPEND``
    descriptor, so SLURM array tasks finishing together never interleave lines.
    """
    results_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="raise", lineterminator="\n")
    fd = os.open(results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size == 0:
            writer.writeheader()
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
        os.write(fd, buffer.getvalue().encode())
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def final_validation(run_dir: Path, steps: int) -> tuple[float, int]:
    """``(valid_loss, step)`` of the last validation in ``metrics.jsonl``, checked to be final.

    Raises ``RuntimeError`` saying why when there is none, it is not at step ``steps``, or the
    loss is not finite.
    """
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise RuntimeError(f"{metrics} does not exist")
    last = None
    for line in metrics.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("kind") == "valid" and "valid_loss" in record:
                last = record
    if last is None:
        raise RuntimeError(f"{metrics} has no validation record (is there a valid split, and "
                           "run.eval_interval > 0?)")
    if int(last["step"]) != steps:
        raise RuntimeError(f"the last validation in {metrics} is at step {last['step']}, not at the "
                           f"run's last step {steps} (did --run.max_steps stop it early?)")
    loss = float(last["valid_loss"])
    if not math.isfinite(loss):
        raise RuntimeError(f"the final valid_loss in {metrics} is {loss}")
    return loss, int(last["step"])


def result_row(manifest: Manifest, run: ManifestRun, loss: float, step: int, seconds: float) -> dict:
    return {
        "run_id": run.run_id, "budget": repr(run.budget), "flops_mode": run.flops_mode,
        "hidden_size": run.hidden_size, "num_layers": run.num_layers, "n_params": run.n_params,
        "n_params_total": run.n_params_total, "tokens": run.tokens, "steps": run.steps,
        "flops_exact": repr(run.flops_exact), "flops_6n": repr(run.flops_6n),
        "valid_loss": repr(loss), "valid_step": step, "vocab_size": manifest.header.get("vocab_size", ""),
        "seq_length": run.seq_length, "seconds": f"{seconds:.1f}", "finished_utc": _now(),
        "run_dir": str(manifest.run_dir(run)),
    }


# ----------------------------------------------------------------------------- local / torchrun
@dataclass
class SweepReport:
    """What one ``run_sweep`` call did."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run id, why + log path)

    @property
    def ok(self) -> bool:
        return not self.failed


def _duration(seconds: float) -> str:
    return str(_dt.timedelta(seconds=int(round(seconds))))


def run_sweep(manifest: Manifest, results_path: Path, launcher: str = "local", nproc: int = 1,
              overrides: Sequence[str] = (), indices: Sequence[int] | None = None,
              runner: Runner = subprocess_runner, python: str = sys.executable,
              out: TextIO | None = None) -> SweepReport:
    """Train every run of ``manifest`` not yet in ``results_path`` (or only ``indices``)."""
    out = out or sys.stdout
    runs = manifest.runs if indices is None else [manifest.runs[i] for i in indices]
    report = SweepReport()
    env = dict(os.environ)
    start = time.monotonic()
    flops_done = 0.0
    flops_todo = sum(r.flops_exact for r in runs if r.run_id not in recorded_runs(results_path))
    for position, run in enumerate(runs, start=1):
        tag = f"[{position}/{len(runs)}] {run.run_id}"
        if run.run_id in recorded_runs(results_path):
            report.skipped.append(run.run_id)
            print(f"{tag}: already in {results_path}, skipped", file=out, flush=True)
            continue
        run_dir = manifest.run_dir(run)
        log = run_dir / "train.log"
        argv = train_command(manifest, run, launcher, nproc, overrides, python)
        notice = ignored_settings_notice(manifest, run, overrides)
        if notice:
            print(f"{tag}: {notice}", file=sys.stderr, flush=True)
        print(f"{tag}: d={run.hidden_size} L={run.num_layers} N={run.n_params / 1e6:.2f}M "
              f"D={run.tokens / 1e6:.2f}M tokens, {run.steps} steps; log {log}", file=out, flush=True)
        t0 = time.monotonic()
        try:
            code = runner(argv, log, env)
        except OSError as err:
            code, why = -1, f"could not start: {err}"
        else:
            why = f"exit code {code}"
        seconds = time.monotonic() - t0
        if code == 0:
            try:
                loss, step = final_validation(run_dir, run.steps)
            except (RuntimeError, ValueError, KeyError) as err:
                code, why = 1, f"finished but no usable result: {err}"
        if code != 0:
            report.failed.append((run.run_id, f"{why}; log {log}"))
            print(f"{tag}: FAILED after {_duration(seconds)} ({why}); log {log}", file=out, flush=True)
            continue
        append_result(results_path, result_row(manifest, run, loss, step, seconds))
        report.done.append(run.run_id)
        flops_done += run.flops_exact
        elapsed = time.monotonic() - start
        eta = elapsed / flops_done * (flops_todo - flops_done) if flops_done else 0.0
        print(f"{tag}: valid_loss {loss:.4f} in {_duration(seconds)} (sweep {_duration(elapsed)}, "
              f"about {_duration(eta)} left by FLOPs)", file=out, flush=True)
    print(f"sweep: {len(report.done)} done, {len(report.skipped)} skipped, {len(report.failed)} failed; "
          f"results in {results_path}", file=out, flush=True)
    for run_id, why in report.failed:
        print(f"  failed {run_id}: {why}", file=out, flush=True)
    return report


# ----------------------------------------------------------------------------- slurm
def slurm_script(manifest: Manifest, results_path: Path, nproc: int = 8, overrides: Sequence[str] = (),
                 max_parallel: int | None = None, time_limit: str | None = None,
                 python: str = "python") -> str:
    """A job-array script in the style of ``launchers/slurm.sbatch``: one task per run.

    Each task is one node with ``nproc`` GPUs and calls back into ``scaling sweep --index``,
    which skips a recorded run, launches torchrun, and appends the result. SIGUSR1 (five
    minutes before the time limit) requeues the task; the trainer resumes from its newest
    checkpoint.
    """
    n = len(manifest.runs)
    if n == 0:
        raise ValueError(f"{manifest.path}: no runs to submit")
    # NOTE: comment and #SBATCH lines cannot quote: what goes there is checked, never quoted;
    # everything on a command line goes through shlex.quote (issue 21).
    grid_name = plain_name(manifest.header.get("grid", {}).get("name", "custom"),
                           f"{manifest.path}: grid.name")
    root = sbatch_path(manifest.root.resolve(), "manifest folder")
    if max_parallel is not None and (isinstance(max_parallel, bool) or not isinstance(max_parallel, int)
                                     or max_parallel < 1):
        raise UnsafeValueError(f"--max-parallel: must be a whole number >= 1, got {max_parallel!r}")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise UnsafeValueError(f"--nproc: must be a whole number >= 1, got {nproc!r}")
    array = f"0-{n - 1}" + (f"%{max_parallel}" if max_parallel else "")
    extra = " ".join(shlex.quote(o) for o in overrides)
    lines = [
        "#!/usr/bin/env bash",
        f"# IsoFLOP sweep {grid_name}: {n} runs, one array task each.",
        f"#   sbatch {root}/sweep.sbatch",
        "# Written by `soda-mega scaling sweep --launcher slurm`; rerun that command to regenerate.",
        "#SBATCH --job-name=soda-scaling",
        f"#SBATCH --array={array}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={nproc}",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        f"#SBATCH --output={root}/logs/%x-%A_%a.out",
        "#SBATCH --open-mode=append",  # a requeued task keeps its earlier output
    ]
    if time_limit is not None:
        lines.append(f"#SBATCH --time={slurm_time(time_limit)}")
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd().resolve()))}",
        f"PYTHON=${{PYTHON:-{shlex.quote(python)}}}",
        "requeue() {",
        '  echo "soda-mega: SIGUSR1, requeueing ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} '
        '(it resumes from its newest checkpoint)"',
        '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        "}",
        "trap requeue USR1",
        f'"$PYTHON" -m soda_mega.cli scaling sweep {shlex.quote(str(manifest.path.resolve()))} '
        f'--results {shlex.quote(str(results_path.resolve()))} --index "$SLURM_ARRAY_TASK_ID" '
        f'--launcher torchrun --nproc {nproc} {extra} &',
        "wait $!",
    ]
    return "\n".join(lines) + "\n"


def submit_slurm(script: str, manifest: Manifest, dry_run: bool, out: TextIO | None = None,
                 sbatch: str = "sbatch") -> int:
    """Write ``sweep.sbatch`` next to the manifest and submit it (or only print it)."""
    out = out or sys.stdout
    path = manifest.root / "sweep.sbatch"
    path.write_text(script)
    (manifest.root / "logs").mkdir(exist_ok=True)
    if dry_run:
        print(script, end="", file=out)
        print(f"# written to {path}; not submitted (--dry-run)", file=out)
        return 0
    try:
        done = subprocess.run([sbatch, str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        print(f"soda-mega: {sbatch} not found; the script is in {path} (submit it on the cluster)",
              file=out)
        return 1
    print((done.stdout + done.stderr).strip(), file=out)
    return done.returncode
