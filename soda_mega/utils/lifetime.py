"""Helper processes never outlive the process that started them.

A trainer starts helper processes: DataLoader workers (forked), Megatron's checkpoint writer
processes (forked) and the ``multiprocessing`` manager that collects their results (spawned,
a fresh interpreter), which in turn keeps ``multiprocessing``'s resource tracker alive. When the
trainer is killed with SIGKILL (OOM killer, a scheduler, a user), nothing tells them: the
manager and the tracker lived on for minutes (~290 MB).

Linux's ``PR_SET_PDEATHSIG`` asks the kernel to send a signal to a process when its parent
dies; :func:`die_with_parent` sets it (SIGKILL) in the calling process. It is installed

- in every process forked from the main thread, by an ``os.register_at_fork`` hook
  (:func:`children_die_with_this_process`);
- in Megatron's spawned results-queue manager, which is created here with
  :func:`die_with_parent` as its initializer instead of by Megatron
  (:func:`adopt_megatron_writer_queue`);
- in the spawned processes of a pool (``data build``'s workers and their feeders), as the
  first thing they run, before they import what they work with (:func:`spawned_dying_with`);

and the resource tracker exits by itself once every process holding its pipe is gone.

NOTE: the kernel sends the signal when the *thread* that forked the child exits, so the hook
only marks children forked from the main thread (whose end is the process's end).

Helper processes also ignore the stop signals SIGTERM and SIGUSR1 (:func:`ignore_stop_signals`):
torchrun and SLURM send them to the whole process group, and the trainer answers them by
finishing its step and saving, which needs its helpers alive (a DataLoader worker killed by
SIGTERM makes the trainer fail with "DataLoader worker exited unexpectedly"). They end with the
trainer instead.

That breaks one assumption of ``multiprocessing``: at interpreter exit it ends the daemon
children still running with SIGTERM and then waits for them, forever if they ignore it (a
DataLoader iterator kept alive by a traceback held to the end did that).
:func:`end_helpers_at_exit` registers an exit hook that runs first and ends them within a grace
period, SIGKILL after it.

Processes forked *inside* :func:`forks_finish_their_work` (Megatron's checkpoint writers, and the
background process of an asynchronous save with its own writers) ignore the stop signals from
their first instruction: the stop signal that torchrun or SLURM sends to the whole process group
during a save used to kill them, and the trainer then waited forever for their results. The
signals are blocked across the fork itself, so none can land between the fork and the child's
hooks; the parent gets its own copy as soon as the fork returns.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import multiprocessing
import multiprocessing.util  # noqa: F401  (registers multiprocessing's exit hook: see below)
import os
import signal
import sys
import threading
import time

from soda_mega.utils.stop_signals import STOP_SIGNALS

_PR_SET_PDEATHSIG = 1
# hook installed; main thread of this process; thread and pid that fork (set before each fork);
# libc's prctl (None: not looked up yet, False: not available)
_state = {"hook": False, "main": None, "forker": None, "parent": None, "prctl": None,
          "exit_hook": False}
# Inside forks_finish_their_work: the callable each forked child runs first (None: not inside)
# and how many processes the block has forked so far (in a child: counting its own forks on).
_finishing: dict = {"child_init": None, "forks": 0}
EXIT_GRACE_S = 5.0  # how long a daemon child has to end after SIGTERM at exit
_manager = None  # the adopted Megatron results-queue manager (kept alive with the process)


def _prctl():
    """libc's ``prctl``, looked up once. NOTE: looked up in the parent, before it forks: a
    ``dlopen`` in a child forked from a multi-threaded process can deadlock on the loader lock
    another thread held at the fork."""
    if _state.get("prctl") is None and sys.platform.startswith("linux"):
        try:
            _state["prctl"] = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            _state["prctl"] = False
    return _state.get("prctl") or None


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux); exit now if
    the parent is already gone. Returns False where the call is not available."""
    prctl = _prctl()
    if prctl is None or prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    # NOTE: the parent may have died between fork and prctl; then the signal never comes.
    expected = _state["parent"]
    if expected is not None and os.getppid() != expected:
        os._exit(1)
    return True


def die_with(parent_pid: int, sig: int = signal.SIGKILL) -> bool:
    """:func:`die_with_parent` in a process that ``parent_pid`` started without a fork (spawned
    workers: no fork hook reaches them); exits now if that parent is already gone."""
    _state["parent"] = parent_pid
    return die_with_parent(sig)


def spawned_dying_with(parent_pid: int, initializer: str, *args) -> None:
    """Initializer of a pool of spawned processes: :func:`die_with` ``parent_pid`` first, then
    import ``initializer`` (``"package.module:function"``) and call it with ``args``.

    Use as ``initializer=spawned_dying_with, initargs=(os.getpid(), "pkg.mod:init", *args)``,
    with ``args`` whose classes live in light modules. A spawned process unpickles its
    initializer and arguments before it runs anything, importing their modules; when those
    import torch, a process whose parent was killed as it started went on importing (1.4 s of
    CPU, over 20 s on a loaded machine) before it learnt its parent was gone.
    """
    die_with(parent_pid)
    module, _, name = initializer.partition(":")
    getattr(importlib.import_module(module), name)(*args)


def ignore_stop_signals() -> None:
    """SIGTERM and SIGUSR1 are for the trainer (it saves and exits); a helper ends with it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def helper_process_init(*_args) -> None:
    """Initializer of a helper process (``worker_init_fn`` of a DataLoader, a manager's
    initializer): dies with its parent, leaves the stop signals to it."""
    die_with_parent()
    ignore_stop_signals()


def end_helpers_at_exit() -> None:
    """At this process's exit, end its daemon ``multiprocessing`` children (DataLoader workers,
    ...) before ``multiprocessing``'s own exit hook waits for them: SIGTERM, then SIGKILL after
    :data:`EXIT_GRACE_S` for those that ignore it (idempotent)."""
    if not _state["exit_hook"]:
        # NOTE: exit hooks run last-registered first; multiprocessing.util registered its own
        # when this module imported it, so this one runs before it.
        atexit.register(_end_daemon_children)
        _state["exit_hook"] = True


def _end_daemon_children() -> None:
    children = [p for p in multiprocessing.active_children() if p.daemon]
    for child in children:
        child.terminate()
    deadline = time.monotonic() + EXIT_GRACE_S
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():
            child.kill()
            child.join()


@contextlib.contextmanager
def forks_finish_their_work(child_init=None):
    """Processes forked in this block ignore SIGTERM / SIGUSR1 and run ``child_init(index)``
    first (a test's fault injection; ``index`` counts the processes forked in the block, 0 for
    the first, their own forks included): a writer of a checkpoint finishes its bounded work
    and exits, and the process that forked it decides what a stop signal means. Also makes
    every later fork from the main thread die with this process
    (:func:`children_die_with_this_process`)."""
    children_die_with_this_process()
    previous = _finishing["child_init"], _finishing["forks"]
    _finishing["child_init"], _finishing["forks"] = child_init or _no_init, 0
    try:
        yield
    finally:
        _finishing["child_init"], _finishing["forks"] = previous


def _no_init(_index: int) -> None:
    return None


def _before_fork() -> None:
    _state["forker"] = threading.get_ident()
    _state["parent"] = os.getpid()
    if _finishing["child_init"] is not None:
        _finishing["forks"] += 1
        # NOTE: blocked, not ignored: a signal that arrives during the fork stays pending in the
        # parent (delivered when _after_fork_parent unblocks it) and is discarded in the child,
        # whose handlers are SIG_IGN by the time it unblocks.
        _state["blocked"] = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _after_fork_parent() -> None:
    blocked = _state.pop("blocked", None)
    if blocked is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def children_die_with_this_process() -> None:
    """Every process later forked from this process's main thread gets SIGKILL when this process
    dies (idempotent)."""
    if _state["hook"] or not hasattr(os, "register_at_fork"):
        return
    # NOTE: the forking thread's ident is taken in the parent; in the child the forking thread
    # becomes the main thread, so comparing there would always match.
    _state["main"] = threading.main_thread().ident
    _prctl()
    end_helpers_at_exit()
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent,
                        after_in_child=_after_fork_child_check)
    _state["hook"] = True


def _after_fork_child_check() -> None:
    if _state["forker"] == _state["main"]:
        die_with_parent()
    blocked = _state.pop("blocked", None)
    if blocked is not None:
        # NOTE: after every other at-fork hook of this child (this one is registered after
        # soda_mega.utils.stop_signals', which puts the default handlers back): the stop
        # signals stay ignored for the life of this helper.
        ignore_stop_signals()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _finishing["child_init"](_finishing["forks"] - 1)


def adopt_megatron_writer_queue() -> None:
    """Create Megatron's checkpoint-writer results queue here, in a manager process that dies
    with this one.

    NOTE: ``megatron.core.dist_checkpointing.strategies.filesystem_async`` (0.16) makes one
    ``multiprocessing`` manager per process on the first save (spawned: a fresh interpreter,
    which no fork hook reaches) and keeps its queue in a module global. Its getter is replaced
    by one that starts the same spawned manager with :func:`helper_process_init` as the
    initializer; the rest of Megatron's code path is unchanged. A Megatron without that getter
    is left alone.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    except ImportError:
        return
    original = getattr(fsa, "_get_write_results_queue", None)
    if original is None or getattr(original, "_soda_adopted", False):
        return

    def get_write_results_queue():
        global _manager
        if fsa._results_queue is None:
            import multiprocessing as mp
            from multiprocessing.managers import SyncManager

            _manager = SyncManager(ctx=mp.get_context("spawn"))
            _manager.start(initializer=_spawned_helper_init, initargs=(os.getpid(),))
            fsa._results_queue = _manager.Queue()
        return fsa._results_queue

    get_write_results_queue._soda_adopted = True
    fsa._get_write_results_queue = get_write_results_queue


def _spawned_helper_init(parent_pid: int) -> None:
    die_with(parent_pid)
    ignore_stop_signals()
