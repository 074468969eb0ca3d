"""Expected failures and the exit codes of ``soda-mega``.

An expected failure is one the user can fix: a configuration value, a dataset, a checkpoint, an
input file. Each subclasses :class:`SodaUserError`, and its message names the file, field or
value and says what to do. ``soda-mega`` (:mod:`soda_mega.cli`) prints it as one line,
``soda-mega: error: ...``, without a traceback, and exits with :data:`EXIT_USER_ERROR` (under
torchrun, local rank 0 prints it and every rank records it in its torchrun error file:
:func:`record_error`, read by :mod:`soda_mega.parallel.torchrun`).
Anything else is a bug or an environment failure and keeps its traceback (exit 1).

This module sits at the bottom of the package (it imports nothing of soda-mega), so every layer
can subclass it.
"""

from __future__ import annotations

import json
import os
import sys
import time

EXIT_OK = 0
EXIT_FAILURE = 1        # an unexpected error (traceback printed); a launcher may restart the run
EXIT_USER_ERROR = 2     # a SodaUserError: fix the named file / field / value, then rerun
EXIT_DIVERGED = 3       # run.max_bad_steps non-finite steps in a row (training.TrainingDiverged)
EXIT_PREEMPTED = 4      # SIGUSR1 / SIGTERM: the step was finished and saved; rerun resumes
EXIT_HUNG = 5           # the watchdog: a step exceeded run.step_timeout_s; stacks in run.dir

# Environment variable naming a file where global rank 0 records its exit code (one line,
# ``exit_code=N``). torchrun reports any failed worker as exit 1, so the launchers
# (launchers/torchrun.sh, launchers/slurm.sbatch) read the trainer's own code from there.
STATUS_FILE_ENV = "SODA_MEGA_STATUS_FILE"
# Set by torchrun for each worker: a JSON file the worker may write its error into (torchrun's
# own format, ErrorHandler.record_exception); torchrun's agent reads it when the worker fails.
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"

# How the command ended, beyond its code (``step``, ``message``): written by write_status.
_outcome: dict[str, str] = {}


class SodaUserError(Exception):
    """A failure the user can fix; the message names the file, field or value."""


def note_outcome(**fields) -> None:
    """Details of how this command ends (``step=N``, ``message=...``), written with its exit code
    by :func:`write_status` so that the launchers can end with one line saying it."""
    # NOTE: one line each: the launchers read the file line by line (sed, never eval).
    _outcome.update({key: " ".join(str(value).split()) for key, value in fields.items()})


def forget_outcome() -> None:
    """A new command starts (in-process callers run several): no details of the last one."""
    _outcome.clear()


def under_torchrun() -> bool:
    """This process is a worker that torchrun started (it set the worker's error file)."""
    return bool(os.environ.get(ERROR_FILE_ENV))


def record_error(message: str, callstack: str = "") -> None:
    """Write ``message`` (and a traceback) into this worker's torchrun error file, in torchrun's
    format, so the launcher's summary can name the rank and its error
    (:mod:`soda_mega.parallel.torchrun`); nothing outside torchrun. ``time_ns`` orders the
    failures of one second: the first to fail is the cause, the others followed it."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {
        "py_callstack": callstack, "timestamp": str(int(time.time())), "time_ns": time.time_ns()}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the traceback or message on stderr still says it


def write_status(code: int, *, any_rank: bool = False) -> None:
    """Record ``code`` (and :func:`note_outcome`'s details) in ``$SODA_MEGA_STATUS_FILE`` when it
    is set (atomically), from global rank 0 only unless ``any_rank`` (the watchdog: whichever
    rank hangs first says so)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if not path or (not any_rank and os.environ.get("RANK", "0") != "0"):
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(f"exit_code={code}\n")
            f.writelines(f"{key}={value}\n" for key, value in _outcome.items())
        os.replace(tmp, path)
    except OSError as err:
        print(f"soda-mega: could not write {STATUS_FILE_ENV}={path}: {err}", file=sys.stderr)
