"""Expected failures and the exit codes of ``soda-mega``.

An expected failure is one the user can fix: a configuration value, a dataset, a checkpoint, an
input file. Each subclasses :class:`SodaUserError`, and its message names the file, field or
value and says what to do. ``soda-mega`` (:mod:`soda_mega.cli`) prints it as one line,
``soda-mega: error: ...``, without a traceback, and exits with :data:`EXIT_USER_ERROR`.
Anything else is a bug or an environment failure and keeps its traceback (exit 1).

This module sits at the bottom of the package (it imports nothing of soda-mega), so every layer
can subclass it.
"""

from __future__ import annotations

import os
import sys

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


class SodaUserError(Exception):
    """A failure the user can fix; the message names the file, field or value."""


def write_status(code: int, *, any_rank: bool = False) -> None:
    """Record ``code`` in ``$SODA_MEGA_STATUS_FILE`` when it is set (atomically), from global
    rank 0 only unless ``any_rank`` (the watchdog: whichever rank hangs first says so)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if not path or (not any_rank and os.environ.get("RANK", "0") != "0"):
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(f"exit_code={code}\n")
        os.replace(tmp, path)
    except OSError as err:
        print(f"soda-mega: could not write {STATUS_FILE_ENV}={path}: {err}", file=sys.stderr)
