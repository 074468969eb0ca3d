"""A stop signal that reaches `soda-mega train` while it is still importing (issue 23 gap).

SLURM's SIGUSR1 may arrive in a worker's first seconds. Before the fix the worker had no
handler until the trainer's own was installed, after torch and Megatron-core were imported, so
the signal killed it (a crash to the launcher, no requeue). Now ``soda-mega`` records stop
signals from its first line: the trainer acts on them (exit 4, nothing to save), and any other
command gets the signal raised again with its original meaning when it ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_env import clean_env
from test_train_runs import _args, corpus  # noqa: F401

pytestmark = pytest.mark.distributed


def _torch_is_loading(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_sigusr1_during_the_imports_stops_train_cleanly(corpus, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "soda_mega.cli", *_args(corpus, tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env())
    deadline = time.monotonic() + 60
    while not _torch_is_loading(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    # Still importing torch: long before the trainer (or any model code) exists.
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 4, (proc.returncode, err[-3000:])
    assert "stopped by SIGUSR1 before this run's first step; nothing new to save" in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").glob("step_*"))


def _catches(pid: int, sig: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    caught = int(status.split("SigCgt:")[1].split()[0], 16)
    return bool(caught >> (sig - 1) & 1)


def test_sigterm_still_ends_other_commands_at_once(tmp_path):
    """`data demo` (a minute or more of work) releases the held signals after its imports:
    a SIGTERM during its work ends it right away, as it always did."""
    proc = subprocess.Popen([sys.executable, "-m", "soda_mega.cli", "data", "demo", str(tmp_path / "demo")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env())
    deadline = time.monotonic() + 60
    held = released = False
    while proc.poll() is None and time.monotonic() < deadline:
        catching = _catches(proc.pid, signal.SIGTERM)
        held = held or catching
        released = held and not catching  # held during the imports, released since
        if released:
            break
        time.sleep(0.002)
    if not released:
        proc.kill()
        proc.communicate()
    assert held, "SIGTERM was never held while soda-mega started"
    assert released, "SIGTERM was still held 60 s into `data demo`"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.returncode
    assert time.monotonic() - start < 20


def test_held_signals_keep_their_meaning_for_other_code():
    """In-process: while held a signal only is recorded; released, the original handler gets
    it once; a forked child never inherits the recorder."""
    from soda_mega.utils import stop_signals

    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: seen.append(signum))
    try:
        stop_signals.hold()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == []
        pid = os.fork()
        if pid == 0:  # the child: SIGTERM must end it (its original, default meaning)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        stop_signals.release()
        assert seen == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR1)  # released: straight to the original handler
        assert seen == [signal.SIGUSR1, signal.SIGUSR1]
    finally:
        stop_signals.release()
        signal.signal(signal.SIGUSR1, previous)
