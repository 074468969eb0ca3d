"""Stop signals that arrive while soda-mega is still starting up.

SLURM's preemption notice (SIGUSR1) and a scheduler's SIGTERM may reach a worker in its first
seconds, while Python imports torch and Megatron-core, before ``soda-mega train`` installs the
handler that turns them into "finish the step, save, exit 4"
(:class:`soda_mega.training.preemption.PreemptionFlag`). With the default action the worker
would just die, and the launcher would count a crash instead of requeueing.

:func:`hold` is the first thing ``soda-mega`` does: from then on a stop signal is only recorded.
The trainer :func:`claim` s the recorded ones when its own handler is in place. Every other
command :func:`release` s them as soon as its imports are done: the original handlers come back
and each held signal is raised again, so its work keeps the meaning the signal always had.
Standard library only: this must be importable before anything heavy.
"""

from __future__ import annotations

import os
import signal
import threading

# Index + 1 is the code the trainer's ranks all-reduce: the largest code names the signal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_previous: dict[int, object] = {}
_pending: list[int] = []
_answered: list[bool] = []  # answered() was called (a list: no global statement needed)
_fork_hook = False


def _record(signum: int, _frame) -> None:
    _pending.append(signum)


def _forget_in_child() -> None:
    # NOTE: a forked helper (a multiprocessing pool's worker, which terminate() stops with
    # SIGTERM) must not inherit the recorder: it gets the original handlers back. A child that
    # another at-fork hook made ignore them (a checkpoint writer: soda_mega.utils.lifetime)
    # keeps ignoring them.
    for sig, handler in _previous.items():
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, handler)
    _previous.clear()
    _pending.clear()


def hold() -> None:
    """Record stop signals instead of acting on them (main thread only; a no-op elsewhere)."""
    global _fork_hook
    if _previous or threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        _previous[sig] = signal.signal(sig, _record)
    if not _fork_hook:
        os.register_at_fork(after_in_child=_forget_in_child)
        _fork_hook = True


def claim() -> list[int]:
    """The stop signals recorded so far (in arrival order), now the caller's to act on."""
    taken = list(_pending)
    _pending.clear()
    return taken


def answered() -> None:
    """The command has answered the stop signals (the trainer: the run is over and its exit code
    says how): until :func:`release`, they are ignored and those held are dropped.

    NOTE: torchrun stops the workers still running once one has left; a worker that got that
    SIGTERM while it was ending died of it instead of exiting with its code."""
    if threading.current_thread() is not threading.main_thread():
        return
    _answered.append(True)
    claim()
    if _previous:
        ignore()


def was_answered() -> bool:
    return bool(_answered)


def release() -> None:
    """Put the original handlers back and raise each signal that is still held (none after
    :func:`answered`)."""
    if not _previous:
        return
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    held = claim()
    for signum in dict.fromkeys(held):  # once each, in arrival order
        signal.raise_signal(signum)


def ignore() -> None:
    """Ignore the stop signals from now on (a process that is ending with its code decided)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
