"""Who holds a lock file, and whether the holder it names is gone.

Two kinds of work must not run twice at once on one folder: a build part
(:mod:`soda_mega.data.write.part_lock`) and a training run (:mod:`soda_mega.training.run_lock`).
Each writes a lock file naming its holder (:func:`owner_record`: host, pid, SLURM job or array
task, attempt, start time) and touches it every :data:`HEARTBEAT_S` seconds (:class:`Heartbeat`).
A second process reads the record and takes the lock over only when the holder is gone
(:func:`why_gone`):

- on this host, no process has its pid (a ``kill -9``, a crash);
- it is an earlier attempt of the SLURM job this process runs as (SLURM requeues a job only
  after ending it; the launchers restart torchrun only after its workers ended);
- its heartbeat stopped more than :data:`STALE_S` seconds ago (another host, not ours to ask).

Standard library only: every layer may use it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

HEARTBEAT_S = 30.0
STALE_S = 600.0  # 20 missed heartbeats


def slurm_task() -> str | None:
    """The SLURM array task (``JOB_TASK``) or job this process runs in, or None."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def attempt() -> list[int]:
    """Which attempt of its job this process is, oldest first: SLURM requeues
    (``SLURM_RESTART_COUNT``), the launchers' restarts (``SODA_MEGA_ATTEMPT``) and torchrun's own
    (``TORCHELASTIC_RESTART_COUNT``); compared as a list, a later attempt is larger."""
    out = []
    for name in ("SLURM_RESTART_COUNT", "SODA_MEGA_ATTEMPT", "TORCHELASTIC_RESTART_COUNT"):
        try:
            out.append(int(os.environ.get(name, "0")))
        except ValueError:
            out.append(0)
    return out


def owner_record() -> dict:
    """This process as a lock file records it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm": slurm_task(),
            "attempt": attempt(), "started": time.time()}


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has ``pid`` (a zombie, dead but not yet reaped, has not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    except (OverflowError, ValueError):
        return False
    stat = _proc_stat(pid)
    return not (stat and stat[0] == "Z")


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return text[text.rfind(")") + 2:].split()


def process_started(pid: int) -> float | None:
    """When the process ``pid`` of this host started (seconds since the epoch), where ``/proc``
    tells; None elsewhere."""
    stat = _proc_stat(pid)
    try:
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, TypeError, IndexError, StopIteration):
        return None


def why_gone(held: dict, me: dict, age_s: float, *, any_run_of_my_task: bool = False) -> str | None:
    """Why the holder ``held`` (a lock record whose file was touched ``age_s`` seconds ago) is
    gone, or None while it may live. ``any_run_of_my_task``: every other run of this process's
    SLURM task is an earlier one (a build task); otherwise only an earlier attempt is."""
    pid = held.get("pid")
    if held.get("host") == me["host"] and isinstance(pid, int):
        if not pid_alive(pid):
            return "that process no longer runs"
        started, recorded = process_started(pid), held.get("started")
        # NOTE: clock ticks and a boot time in whole seconds: a few seconds of slack.
        if started and isinstance(recorded, (int, float)) and started > recorded + 5:
            return "its pid now belongs to a process started after it"
    task = held.get("slurm")
    if task and task == me["slurm"]:
        before = held.get("attempt")
        if any_run_of_my_task or (isinstance(before, list) and before < me["attempt"]):
            return f"it is an earlier run of this SLURM job ({task})"
    if age_s > STALE_S:
        return f"its heartbeat stopped {age_s / 60:.0f} minutes ago"
    return None


def describe(held: dict) -> str:
    """``pid 12 on node3, SLURM job 77, since 2026-01-02 03:04:05`` (a holder, for messages)."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("started") or 0)))
    slurm = f", SLURM job {held['slurm']}" if held.get("slurm") else ""
    return f"pid {held.get('pid')} on {held.get('host')}{slurm} since {since}"


class Heartbeat:
    """Touches ``path`` every :data:`HEARTBEAT_S` seconds in a daemon thread until :meth:`stop`."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = Path(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=name, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # gone or unreachable for a moment: the next beat tries again

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
