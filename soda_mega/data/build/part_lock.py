"""One builder per part of a build at a time.

Two processes building the same part of one folder (a part started twice by hand, a requeued
SLURM array task whose first run is still alive) delete each other's half-written units and
publish units twice. A builder therefore holds ``<root>/.build/locks/part-I-of-N.json`` (a
whole build: ``part-0-of-1.json``) while it works: its host, pid, SLURM task and start time,
created atomically (a hard link of a finished file: never seen half-written) and touched every
:data:`HEARTBEAT_S` seconds.

A lock whose owner is gone is taken over, saying so. Gone means: on this host, no process has
its pid; or it names the SLURM array task this process runs as (SLURM requeues a task only
after ending it); or its heartbeat stopped more than :data:`STALE_S` seconds ago (another host,
not ours to ask). Any other lock refuses the build with a message naming the owner and the file.

NOTE: for a remote ``OUT`` the lock lives in the local staging folder, so it only keeps two
builders on one machine apart; parts on other machines share nothing but the object store.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from soda_mega.errors import SodaUserError

LOCKS_DIR = Path(".build") / "locks"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # 20 missed heartbeats


class PartBusyError(SodaUserError, RuntimeError):
    """Another live process builds this part."""


def _slurm_task() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class PartLock:
    """Context manager: hold the lock of ``part`` (``(i, n)``, or None for a whole build) of
    the build folder ``root``; ``note`` says whether a stale lock was taken over."""

    def __init__(self, root: str | Path, part: tuple[int, int] | None) -> None:
        i, n = part if part is not None else (0, 1)
        self.label = f"{i}/{n}"
        self.root = Path(root)
        self.path = self.root / LOCKS_DIR / f"part-{i}-of-{n}.json"
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "slurm": _slurm_task(),
                      "started": time.time()}
        self.note = ""
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------------ acquire / release
    def __enter__(self) -> "PartLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{self.owner['host']}.{os.getpid()}")
        tmp.write_text(json.dumps(self.owner))
        try:
            try:
                self._create(tmp)
            except FileExistsError:
                held, why_stale = self._read_held()
                if why_stale is None:
                    raise PartBusyError(self._busy_message(held)) from None
                os.replace(tmp, self.path)
                self.note = (f"took over the lock of part {self.label} ({self.path}) from pid "
                             f"{held.get('pid')} on {held.get('host')}: {why_stale}")
        finally:
            tmp.unlink(missing_ok=True)
        self._beat = threading.Thread(target=self._heartbeat, name="soda-part-lock", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._held_by_us():
            self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ internals
    def _create(self, tmp: Path) -> None:
        """The lock file, or FileExistsError: never two owners."""
        try:
            os.link(tmp, self.path)  # appears whole
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: exclusive create, then write
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # gone or unreachable for a moment: the next beat tries again

    def _read_held(self) -> tuple[dict, str | None]:
        """The lock's owner and why it is stale (None: it is live)."""
        try:
            held = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return {}, "it was released meanwhile"
        except (OSError, ValueError):
            held = None
        if not isinstance(held, dict):
            try:
                fresh = time.time() - self.path.stat().st_mtime < HEARTBEAT_S
            except OSError:
                fresh = False
            # NOTE: without hard links, a new lock is empty for a moment while its owner writes it.
            return {}, (None if fresh else "its file was unreadable")
        if held.get("host") == self.owner["host"] and not _pid_alive(int(held.get("pid", -1))):
            return held, "that process no longer runs"
        if held.get("slurm") and held.get("slurm") == self.owner["slurm"]:
            return held, f"it is an earlier run of this SLURM task ({held['slurm']})"
        if age > STALE_S:
            return held, f"its heartbeat stopped {age / 60:.0f} minutes ago"
        return held, None

    def _busy_message(self, held: dict) -> str:
        root = self.root
        if not held:
            return (f"part {self.label} of {root} is being claimed by another builder right now "
                    f"(lock {self.path} is still being written); retry in a minute")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
        slurm = f", SLURM task {held['slurm']}" if held.get("slurm") else ""
        return (f"part {self.label} of {root} is being built by pid {held.get('pid')} on "
                f"{held.get('host')}{slurm} since {since} (lock {self.path}); wait for it, or "
                f"if that process is gone, delete the lock file (it is also taken over once "
                f"its heartbeat has stopped for {STALE_S / 60:.0f} minutes)")

    def _held_by_us(self) -> bool:
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        return held.get("host") == self.owner["host"] and held.get("pid") == self.owner["pid"]
