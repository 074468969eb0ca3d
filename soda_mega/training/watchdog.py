"""Hang watchdog: a loop iteration that takes longer than ``run.step_timeout_s`` ends the run.

A rank that hangs (a collective whose peer is stuck, a read from a dead file system, a deadlock)
otherwise stalls the whole job until the collective timeout, and says nothing about where. The
trainer arms the watchdog at the start of every loop iteration (data, step, logging,
validation, checkpoint), and once before them for the set-up (the checkpoint load of a resume,
the data loader's start). When an iteration outlives the timeout, the watchdog thread

1. appends every thread's Python stack (``faulthandler``) to
   ``run.dir/stacks/step<N>-rank<R>.txt`` and says so on stderr;
2. waits a short grace period, so the other ranks, stuck in the same step, dump theirs too
   before this rank's exit tears their collectives down;
3. exits the process with :data:`~soda_mega.errors.EXIT_HUNG` (5). torchrun then stops the other
   workers, and the launchers restart the run, which resumes from its newest checkpoint.

NOTE: the watchdog is a Python thread, so it needs the GIL. A hang inside C code that holds the
GIL would silence it; ``faulthandler.dump_traceback_later`` (a C thread) is armed as a backstop
60 s later: it writes the stacks to stderr and exits with code 1.
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from pathlib import Path

from soda_mega.errors import EXIT_HUNG, write_status

BACKSTOP_S = 60.0
# Phases of a run other than its steps that the watchdog times (stack files: <phase>-rank<R>.txt)
PHASES = {"setup": "the set-up (checkpoint load, data start)"}


class StepWatchdog:
    """Arm per loop iteration with :meth:`arm`; :meth:`stop` at the end of the run.

    ``timeout_s=None`` makes every method a no-op (no thread is started).
    """

    def __init__(self, timeout_s: float | None, run_dir: Path, rank: int,
                 grace_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.grace_s = min(5.0, timeout_s) if grace_s is None and timeout_s else (grace_s or 0.0)
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._step = 0
        self._phase = ""
        self._stopped = False
        self._thread: threading.Thread | None = None

    def arm(self, step: int, phase: str = "") -> None:
        """Start the clock for the iteration that produces ``step``, or for another ``phase`` of
        the run (``"setup"``: the checkpoint load before the first step), which then names the
        stack files and the message."""
        if not self.timeout_s:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="soda-mega-watchdog",
                                            daemon=True)
            self._thread.start()
        with self._cond:
            self._deadline = time.monotonic() + self.timeout_s
            self._step = step
            self._phase = phase
            self._cond.notify()
        # NOTE: file descriptor 2, not sys.stderr, which a caller may have replaced by an object
        # without a file descriptor.
        faulthandler.dump_traceback_later(self.timeout_s + self.grace_s + BACKSTOP_S, exit=True,
                                          file=2)

    def stop(self) -> None:
        if not self.timeout_s or self._thread is None:
            return
        faulthandler.cancel_dump_traceback_later()
        with self._cond:
            self._stopped = True
            self._deadline = None
            self._cond.notify()
        self._thread.join(timeout=5)
        self._thread = None
        self._stopped = False

    # ------------------------------------------------------------------ the watching thread
    def _watch(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                step, phase = self._step, self._phase
                break
            else:
                return
        self._fire(step, phase)

    def stack_file(self, step: int, phase: str = "") -> Path:
        return self.run_dir / "stacks" / f"{phase or f'step{step:08d}'}-rank{self.rank:05d}.txt"

    def _fire(self, step: int, phase: str = "") -> None:
        path = self.stack_file(step, phase)
        what = f"step {step}" if not phase else PHASES.get(phase, phase)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(f"soda-mega watchdog {time.strftime('%Y-%m-%d %H:%M:%S')}: rank "
                        f"{self.rank}, pid {os.getpid()}: {what} exceeded "
                        f"run.step_timeout_s={self.timeout_s:g}; Python stacks of every thread:\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            where = f"stacks in {path}"
        except OSError as err:
            faulthandler.dump_traceback(file=2, all_threads=True)
            where = f"could not write {path} ({err}); stacks on stderr"
        os.write(2, (f"soda-mega: watchdog: rank {self.rank}: {what} made no progress for "
                     f"run.step_timeout_s={self.timeout_s:g} s; {where}; exiting with code "
                     f"{EXIT_HUNG} so the launcher restarts the run\n").encode())
        write_status(EXIT_HUNG, any_rank=True)
        time.sleep(self.grace_s)
        os._exit(EXIT_HUNG)
