"""Asynchronous checkpoint saves: the training loop blocks only while the state is handed over.

Built on Megatron-core's own machinery. ``dist_checkpointing.save(..., async_sharded_save=True)``
plans the save (a collective) and returns an ``AsyncRequest``; Megatron's ``AsyncCallsQueue``
runs its write in a forked process (``TemporalAsyncCaller``), after copying GPU tensors to host
memory. The fork is a copy-on-write snapshot of the host memory, so the loop goes on training
while the background process writes the state as it was (on CPU it costs at most one more copy
of the pages the loop changes meanwhile). The background process also hashes the files it
wrote, so the manifest needs no second read of them.

Everything :func:`~soda_mega.checkpoint.save.save_checkpoint` promises still holds, as the
same code publishes: the write goes to ``step_N.tmp``; when every rank's write has finished
(one small all-reduce per step while a save is in flight, none otherwise) the ranks finalize
together: Megatron's metadata, the manifest, the rename to ``step_N``, ``latest``, pruning. A
kill -9 at any moment leaves ``latest`` on an intact checkpoint (the background process dies
with its trainer); a failed write fails the save on every rank with one message; at most one
save is in flight (the next one waits for it, and says how long); a stop signal or the end of
training waits for the write in flight and publishes it before the process exits.

The processes a save forks ignore SIGTERM and SIGUSR1
(:func:`soda_mega.utils.lifetime.forks_finish_their_work`): the trainer answers those.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import threading
import time
from pathlib import Path
from typing import NamedTuple

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from torch.distributed.checkpoint.api import CheckpointException

from soda_mega.checkpoint.manifest import file_hash
from soda_mega.checkpoint.save import begin, check_agreed, publish, sharded_state, write_small_files, writer_results
from soda_mega.utils.lifetime import forks_finish_their_work

_DRAIN_WAIT_S = 60.0  # after the background process ended, for its last bytes to be read


class SaveReport(NamedTuple):
    """A published checkpoint: ``blocked_s`` is the time the loop spent on it (handing the
    state over, waiting for the write, finalizing), ``seconds`` from the start to the publish."""

    step: int
    path: Path
    bytes: int
    seconds: float
    blocked_s: float

    @classmethod
    def of(cls, step: int, path: Path, started: float) -> SaveReport:
        """The report of a synchronous save of ``step`` started at ``started`` (perf_counter)."""
        seconds = time.perf_counter() - started
        return cls(step, path, _folder_bytes(path), seconds, seconds)

    def line(self) -> str:
        return (f"saved step {self.step} ({self.bytes / 1e9:.2f} GB in {self.seconds:.1f} s, loop "
                f"blocked {self.blocked_s:.2f} s)")


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class ChildPipe:
    """Objects sent by a forked process to this one, read here by a thread as they come.

    NOTE: Megatron hands write results over a queue served by a spawned ``multiprocessing``
    manager (a second interpreter, ~290 MB); a plain pipe read only after the child ended would
    block a child whose results outgrow the pipe's buffer. Create before the fork, call
    :meth:`forked` in the parent after it; the child calls :meth:`put`."""

    def __init__(self) -> None:
        self._recv, self._send = multiprocessing.Pipe(duplex=False)
        self._items: list = []
        self._thread = threading.Thread(target=self._drain, daemon=True, name="soda-save-pipe")
        self._thread.start()

    def _drain(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                self._items.append(self._recv.recv())

    def put(self, item) -> None:
        self._send.send(item)

    def forked(self) -> None:
        """The parent's end of the writing side is closed: the reading ends with the child."""
        self._send.close()

    def get_nowait(self):
        """The next object sent (the child has ended); ``queue.Empty`` when none came."""
        self._thread.join(_DRAIN_WAIT_S)
        if not self._items:
            raise queue.Empty
        return self._items.pop(0)


def _write_then_hash(write, hashes: ChildPipe, *args) -> None:
    """The background process: Megatron's write, then the hash of every file it wrote."""
    write(*args)
    done = {}
    for file_name, _key, _data in args[1]:  # Megatron's write buckets
        path = Path(file_name)
        with contextlib.suppress(OSError):  # a failed write is reported by Megatron's finalize
            done[path.name] = (path.stat().st_size, file_hash(path))
    hashes.put(done)


class _InFlight(NamedTuple):
    step: int
    tmp: Path
    final: Path
    hashes: ChildPipe
    started: float
    blocked_s: float


class AsyncSaver:
    """Checkpoints of one run folder (``root``), at most one in flight.

    Every method is a collective: all ranks call it at the same point of the loop."""

    def __init__(self, root: str | Path, keep_last: int = 3) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self._queue = AsyncCallsQueue(persistent=False)
        self._in_flight: _InFlight | None = None

    @property
    def in_flight(self) -> int | None:
        """The step being written, None when no save is in flight."""
        return self._in_flight.step if self._in_flight else None

    def start(self, step: int, model, optimizer, trainer_state: dict,
              writer_init=None) -> SaveReport | None:
        """Hand ``step``'s state to a background write and return. A save still in flight is
        finished first: its report is returned (None when there was none)."""
        before = self.wait()
        started = time.perf_counter()
        tmp, final = begin(self.root, step)
        hashes = error = None
        try:
            hashes = ChildPipe()
            results = ChildPipe()
            with writer_results(results):
                request = dist_checkpointing.save(sharded_state(model, optimizer), str(tmp),
                                                  async_sharded_save=True)
            write_small_files(self.root, tmp, trainer_state)
            if request.async_fn is not None:
                request = request._replace(async_fn=_Writer(request.async_fn, hashes))
            with forks_finish_their_work(writer_init):
                self._queue.schedule_async_request(request)
            hashes.forked()
            results.forked()
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - reported on every rank
            error = err
        check_agreed(error, tmp, final)
        assert hashes is not None  # check_agreed raised on every rank if the pipe was not made
        self._in_flight = _InFlight(step, tmp, final, hashes, started,
                                    time.perf_counter() - started)
        return before

    def poll(self) -> SaveReport | None:
        """Publish the save in flight if every rank's write has finished (no wait)."""
        return self._finish(blocking=False) if self._in_flight else None

    def wait(self) -> SaveReport | None:
        """Wait for the save in flight, publish it and return its report (None: none)."""
        return self._finish(blocking=True) if self._in_flight else None

    def _finish(self, blocking: bool) -> SaveReport | None:
        job = self._in_flight
        assert job is not None  # poll() and wait() call it only with a save in flight
        began = time.perf_counter()
        error = None
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - reported on every rank
            done, error = [0], err
        if not done:
            return None
        self._in_flight = None
        known = {}
        if error is None:
            with contextlib.suppress(queue.Empty):
                known = job.hashes.get_nowait()
        check_agreed(error, job.tmp, job.final)
        path = publish(self.root, job.tmp, job.final, self.keep_last, known)
        now = time.perf_counter()
        return SaveReport(job.step, path, _folder_bytes(path), now - job.started,
                          job.blocked_s + now - began)


class _Writer:
    """``_write_then_hash`` bound to Megatron's write function, as the request's ``async_fn``
    (a plain class instead of a ``functools.partial``, whose repr Megatron logs in full)."""

    def __init__(self, write, hashes: ChildPipe) -> None:
        self.write, self.hashes = write, hashes

    def __call__(self, *args) -> None:
        _write_then_hash(self.write, self.hashes, *args)
