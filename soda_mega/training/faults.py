"""Fault injection for tests: make one rank misbehave at a chosen step (never set in real runs).

``SODA_MEGA_FAULT`` holds one or more faults separated by ``;``, each
``ACTION:RANK:STEP:ARG[:ATTEMPT]`` (RANK is the global rank, STEP the step being computed,
counted from 1, 0 for the trainer's set-up, ``load`` for the checkpoint load of a resume, or
``write`` for the first process each checkpoint save forks (Megatron's first writer, or the
background process of an asynchronous save), as the first thing that process does, or
``write@N`` for that of the save of step N only;
with ATTEMPT, only while ``SODA_MEGA_ATTEMPT``, which launchers/torchrun.sh
sets to its restart count, equals it, so a restarted run gets past the fault):

- ``sleep:1:3:600``: rank 1 sleeps 600 s inside step 3 (a hung rank, for the watchdog);
- ``raise:1:3:boom``: rank 1 raises ``RuntimeError`` inside step 3 (a crash: a bug, a failed
  device);
- ``signal:1:3:SIGUSR1``: rank 1 sends itself SIGUSR1 inside step 3 (a preemption notice that
  reaches one rank only, mid-step);
- ``wait:0:4:120``: rank 0 holds step 4 open until SIGUSR1 or SIGTERM reaches it (at most 120 s),
  so that a stop signal sent from outside at a time the test does not choose (``scancel``, a
  SLURM time-limit warning) lands inside that step, and the step goes on as soon as it has;
- ``wait:0:write@3:120``: the first writer process of rank 0's save of step 3 holds its write
  open until a stop signal reaches it (at most 120 s): a signal sent to the process group lands
  inside that save.

The trainer calls :func:`inject` once per step, after the step's micro-batches are read and
before its forward pass, with step 0 once during its set-up, before the model is built, and
with ``load`` just before it reads the checkpoint it resumes from.
"""

from __future__ import annotations

import os
import re
import signal
import time

ENV = "SODA_MEGA_FAULT"
ACTIONS = ("sleep", "signal", "wait", "raise")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
POINTS = ("load", "write")  # named places a STEP may be instead of a step number
_WRITE_AT = re.compile(r"write@\d+")


def parse(text: str) -> list[tuple[str, int, int, str, int | None]]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        parts = item.split(":")
        if len(parts) not in (4, 5) or parts[0] not in ACTIONS:
            raise ValueError(f"{ENV}: {item!r} is not ACTION:RANK:STEP:ARG[:ATTEMPT] with ACTION "
                             f"one of {', '.join(ACTIONS)}")
        attempt = int(parts[4]) if len(parts) == 5 else None
        step = parts[2] if parts[2] in POINTS or _WRITE_AT.fullmatch(parts[2]) else int(parts[2])
        faults.append((parts[0], int(parts[1]), step, parts[3], attempt))
    return faults


def inject(step: int | str, rank: int) -> None:
    text = os.environ.get(ENV)
    if not text:
        return
    attempt_now = int(os.environ.get("SODA_MEGA_ATTEMPT", "0"))
    for action, fault_rank, fault_step, arg, attempt in parse(text):
        here = fault_step == step or (fault_step == "write" and str(step).startswith("write@"))
        if fault_rank != rank or not here or attempt not in (None, attempt_now):
            continue
        line = f"soda-mega: {ENV}: rank {rank} step {step}: {action} {arg}\n".encode()
        if action == "sleep":
            os.write(2, line)
            time.sleep(float(arg))
        elif action == "raise":
            raise RuntimeError(f"{ENV}: rank {rank} step {step}: {arg}")
        elif action == "wait":
            got = _wait_for_stop_signal(float(arg), announce=line)
            how = signal.Signals(got).name if got else "the time limit"
            os.write(2, f"soda-mega: {ENV}: rank {rank} step {step}: wait ended by {how}\n".encode())
        else:
            os.write(2, line)
            os.kill(os.getpid(), getattr(signal, arg))


def writer_fault(step: int, rank: int, index: int) -> None:
    """The ``write@N`` point, run first in each process a save of ``step`` forks (``index``:
    0 for the first; soda_mega.utils.lifetime.forks_finish_their_work)."""
    if index == 0:
        inject(f"write@{step}", rank)


def _wait_for_stop_signal(seconds: float, announce: bytes = b"") -> int | None:
    """Sleep until SIGUSR1 / SIGTERM arrives or ``seconds`` pass; the signal still reaches the
    handler that was installed (the trainer's), or, where none was, its default action.
    ``announce`` is written to stderr once the wait listens (a test waits for it, then signals:
    written before, a signal could land before the listener and be lost to an ignoring
    process). Returns the signal that ended the wait (None: the time limit)."""
    got: list[int] = []
    previous = {}

    def record(signum, frame) -> None:
        got.append(signum)
        if callable(previous[signum]):
            previous[signum](signum, frame)

    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, record)
    os.write(2, announce)
    try:
        deadline = time.monotonic() + seconds
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for signum in got:
        if not callable(previous[signum]) and previous[signum] != signal.SIG_IGN:
            signal.raise_signal(signum)
    return got[0] if got else None
