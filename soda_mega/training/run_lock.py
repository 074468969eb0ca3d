"""One training run per run folder at a time.

A resubmitted job whose first run still trains, or a run started twice by hand, would share
``run.dir``: each deletes the other's ``step_N.tmp``, moves the other's checkpoints to
``replaced/``, prunes past ``run.keep_checkpoints`` and loses metrics rows. So global rank 0
holds ``run.dir/run.lock`` for the whole run (:func:`hold_run_folder`, before anything in the
folder is read, moved or written), and every rank of a second run stops with exit 2 and one
line naming the holder.

The lock is two things, and a second run checks both:

- an ``fcntl`` lock on the file, which the kernel (or the NFS lock manager) drops when its
  process dies, however it dies;
- the file's content, the holder's record (:func:`~soda_mega.utils.lock_owner.owner_record`:
  host, pid, SLURM job, attempt, start time), touched every
  :data:`~soda_mega.utils.lock_owner.HEARTBEAT_S` seconds. It keeps runs on other nodes apart
  where the shared file system's ``fcntl`` locks do not reach across nodes.

A free ``fcntl`` lock whose record names a holder that is gone
(:func:`~soda_mega.utils.lock_owner.why_gone`: a dead pid on this host, an earlier attempt of
this SLURM job, a heartbeat stopped for 10 minutes) is taken over, saying so: a run killed with
``kill -9`` resumes at once. The file is never deleted (a process waiting on the old file's
``fcntl`` lock would hold a lock nobody else sees); a finished run empties it.

NOTE: POSIX ``fcntl`` locks belong to a process and any ``close()`` of the file in that process
drops them: the holder reads its own record back through the descriptor it locked, never by
opening the file again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from soda_mega.errors import SodaUserError
from soda_mega.utils.files import not_regular
from soda_mega.utils.lock_owner import HEARTBEAT_S, Heartbeat, describe, owner_record, why_gone

LOCK_FILE = "run.lock"
# After writing its record a new holder reads it back this much later: of two runs that took
# a free lock at the same moment on nodes whose fcntl locks do not meet, the earlier writer sees
# the later one's record and stops.
CONFIRM_S = 0.5
_MAX_RECORD = 1 << 16


class RunFolderBusy(SodaUserError, RuntimeError):
    """Another live training run holds this run folder."""


class RunLock:
    """The lock of the run folder ``run_dir`` (:meth:`acquire`, :meth:`release`); ``note`` says
    whether the lock of a holder that was gone was taken over."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.owner = owner_record()
        self.note = ""
        self._fd: int | None = None
        self._beat: Heartbeat | None = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if problem := not_regular(self.path):
            raise RunFolderBusy(f"{self.path} {problem}; delete it (a run folder's lock is a "
                                "regular file that soda-mega writes)")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            self._take(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._beat = Heartbeat(self.path, "soda-run-lock")
        return self

    def release(self) -> None:
        """Empty the record (if it is still ours) and drop the fcntl lock."""
        if self._fd is None:
            return
        if self._beat is not None:
            self._beat.stop()
        try:
            held, _ = self._read(self._fd)
            if held is not None and _same(held, self.owner):
                os.ftruncate(self._fd, 0)
        except OSError:
            pass  # the folder went away: nothing to release but the descriptor
        os.close(self._fd)
        self._fd = None

    # ------------------------------------------------------------------ internals
    def _take(self, fd: int) -> None:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise RunFolderBusy(self._busy(self._read(fd)[0], "holds its lock")) from None
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # NOTE: a file system without fcntl locks: the record alone keeps runs apart.
        held, age = self._read(fd)
        if held is not None:
            why = why_gone(held, self.owner, age) if held else (
                None if age < HEARTBEAT_S else "its record was unreadable")
            if held and (held.get("host"), held.get("pid")) == (self.owner["host"], os.getpid()):
                why = "an earlier run in this process that did not end"  # in-process callers
            if why is None:
                raise RunFolderBusy(self._busy(held, "is alive"))
            self.note = (f"took over the lock of run folder {self.run_dir} ({self.path}) from "
                         f"{describe(held) if held else 'an unreadable record'}: {why}")
        self._write(fd)
        time.sleep(CONFIRM_S)
        now, _ = self._read(fd)
        if now is None or not _same(now, self.owner):
            raise RunFolderBusy(self._busy(now or {}, "took it at the same moment"))

    def _read(self, fd: int) -> tuple[dict | None, float]:
        """(the record: None when empty, {} when unreadable; seconds since it was touched)."""
        data = os.pread(fd, _MAX_RECORD, 0)
        age = time.time() - os.fstat(fd).st_mtime
        if not data.strip():
            return None, age
        try:
            held = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            return {}, age
        return (held if isinstance(held, dict) else {}), age

    def _write(self, fd: int) -> None:
        data = json.dumps(self.owner).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _busy(self, held: dict | None, how: str) -> str:
        who = describe(held) if held else "another process (its record is being written)"
        return (f"run folder {self.run_dir} is in use by another training run: {who} {how} "
                f"(lock {self.path}); wait for that run to end or stop it, or use another "
                f"run.dir (the lock of a run that is gone is taken over by the next run)")


def _same(a: dict, b: dict) -> bool:
    return a.get("host") == b["host"] and a.get("pid") == b["pid"] and \
        a.get("started") == b["started"]


def hold_run_folder(run_dir: str | os.PathLike) -> RunLock | None:
    """Global rank 0 takes ``run_dir``'s lock; every rank raises :class:`RunFolderBusy` (the
    same message, naming the holder) when it is held. A collective: every rank calls it."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    lock, message = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir).acquire()
        except RunFolderBusy as err:
            message = str(err)
        except OSError as err:
            message = f"run.dir {run_dir}: cannot take the run folder's lock ({err})"
        else:
            if lock.note:
                print(f"soda-mega: WARNING: {lock.note}", file=sys.stderr, flush=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # NOTE: the other ranks learn rank 0's answer here: none of them goes on alone.
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise RunFolderBusy(message)
    return lock
