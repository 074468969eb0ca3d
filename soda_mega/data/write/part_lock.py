"""One builder per part of a build at a time.

Two processes building the same part of one folder (a part started twice by hand, a requeued
SLURM array task whose first run is still alive) delete each other's half-written units and
publish units twice. A builder therefore holds ``<root>/.build/locks/part-I-of-N.json`` (a
whole build: ``part-0-of-1.json``) while it works: its host, pid, SLURM task and start time,
created atomically (a hard link of a finished file: never seen half-written) and touched every
:data:`HEARTBEAT_S` seconds.

A lock whose owner is gone is taken over, saying so (:mod:`soda_mega.utils.lock_owner`, shared
with the run folder's lock). Gone means: on this host, no process has
its pid; or it names the SLURM array task this process runs as (SLURM requeues a task only
after ending it); or its heartbeat stopped more than :data:`STALE_S` seconds ago (another host,
not ours to ask). Any other lock refuses the build with a message naming the owner and the file.

NOTE: for a remote ``OUT`` the lock lives in the local staging folder, so it only keeps two
builders on one machine apart; parts on other machines share nothing but the object store.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from soda_mega.errors import SodaUserError
from soda_mega.utils.lock_owner import HEARTBEAT_S, STALE_S, Heartbeat, describe, owner_record, why_gone

LOCKS_DIR = Path(".build") / "locks"
__all__ = ["HEARTBEAT_S", "LOCKS_DIR", "PartBusyError", "PartLock", "STALE_S"]


class PartBusyError(SodaUserError, RuntimeError):
    """Another live process builds this part."""


class PartLock:
    """Context manager: hold the lock of ``part`` (``(i, n)``, or None for a whole build) of
    the build folder ``root``; ``note`` says whether a stale lock was taken over."""

    def __init__(self, root: str | Path, part: tuple[int, int] | None) -> None:
        i, n = part if part is not None else (0, 1)
        self.label = f"{i}/{n}"
        self.root = Path(root)
        self.path = self.root / LOCKS_DIR / f"part-{i}-of-{n}.json"
        self.owner = owner_record()
        self.note = ""
        self._beat: Heartbeat | None = None

    # ------------------------------------------------------------------ acquire / release
    def __enter__(self) -> PartLock:
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
        self._beat = Heartbeat(self.path, "soda-part-lock")
        return self

    def __exit__(self, *exc) -> None:
        if self._beat is not None:
            self._beat.stop()
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
        # NOTE: SLURM runs an array task once at a time: any other run of it is an earlier one.
        return held, why_gone(held, self.owner, age, any_run_of_my_task=True)

    def _busy_message(self, held: dict) -> str:
        root = self.root
        if not held:
            return (f"part {self.label} of {root} is being claimed by another builder right now "
                    f"(lock {self.path} is still being written); retry in a minute")
        return (f"part {self.label} of {root} is being built by {describe(held)} "
                f"(lock {self.path}); wait for it, or "
                f"if that process is gone, delete the lock file (it is also taken over once "
                f"its heartbeat has stopped for {STALE_S / 60:.0f} minutes)")

    def _held_by_us(self) -> bool:
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        return held.get("host") == self.owner["host"] and held.get("pid") == self.owner["pid"]
