"""A stop signal sent to the trainer's whole process group while a checkpoint is being written.

torchrun and SLURM signal every process of a worker's process group, the processes a save
forks to write its files included. Before the fix those writers died of the signal without
reporting, the trainer waited for them forever, ``step_N.tmp`` stayed and the job was never
requeued (issue 31). Now a writer ignores the stop signals and finishes; the trainer saves the
step, exits 4, and the resumed run follows the golden trace.

Each run is ``soda-mega train`` started as its own process group, signalled with ``killpg``.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launch_env import clean_env
from tiny_golden import STEPS, assert_same_trace, golden_trace, read_trace, run_overrides
from tolerances import TRAINING_TRACE

pytestmark = pytest.mark.distributed

HANG_S = 120  # far above a tiny run's save (well under a second), far below a hang's forever


@pytest.fixture(scope="module")
def corpus(golden_corpus) -> Path:
    """The session's golden corpus (read only; tests/conftest.py)."""
    return golden_corpus


def _args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", *run_overrides(corpus, run_dir), *extra]


class Trainer:
    """``soda-mega train`` of the golden run as the leader of its own process group, its
    stderr collected by a thread (the test waits for lines of it)."""

    def __init__(self, corpus: Path, run_dir: Path, *extra: str, fault: str = "") -> None:
        env = clean_env()
        if fault:
            env["SODA_MEGA_FAULT"] = fault
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "soda_mega.cli", *_args(corpus, run_dir, *extra)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.text()[-3000:]}"
            time.sleep(0.01)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self) -> int:
        """The exit code; a run still alive HANG_S later is killed and reported as hung."""
        try:
            code = self.proc.wait(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.proc.wait()
            self._reader.join(5)
            raise AssertionError(f"hung after the stop signal:\n{self.text()[-3000:]}") from None
        self._reader.join(10)
        return code


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def _leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.tmp*"))


def _finish_and_compare(corpus: Path, run_dir: Path) -> None:
    again = Trainer(corpus, run_dir)
    assert again.finish() == 0, again.text()[-3000:]
    assert_same_trace(read_trace(run_dir), golden_trace(), TRAINING_TRACE["golden_rtol"],
                      keys=("loss", "grad_norm", "lr"))
    assert _latest(run_dir) == f"step_{STEPS:08d}"


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_sigusr1_to_the_group_while_a_writer_writes_saves_the_step(corpus, tmp_path, mode):
    """The first process rank 0's save of step 2 forks (the background writer of an async
    save, Megatron's first writer process of a synchronous one) holds the write open until the
    group's SIGUSR1 reaches it (``SODA_MEGA_FAULT=wait:0:write@2``): the write finishes, the
    step the run stops at is saved, exit 4, nothing left behind; the resumed run follows the
    golden trace."""
    run_dir = tmp_path / "run"
    run = Trainer(corpus, run_dir, "--run.save_interval=1", f"--run.async_save={mode == 'async'}",
                  fault=f"wait:0:write@2:{HANG_S}")
    run.wait_for_line("rank 0 step write@2: wait")
    run.signal_group(signal.SIGUSR1)
    code = run.finish()
    text = run.text()
    assert code == 4, text[-3000:]
    assert "rank 0 step write@2: wait ended by SIGUSR1" in text, text[-3000:]
    # A synchronous save blocks the loop: the run stops right after step 2. An asynchronous
    # one lets the loop go on to step 3, whose save waits for step 2's.
    stopped = 2 if mode == "sync" else int(_latest(run_dir)[5:])
    assert f"stopped by SIGUSR1 after step {stopped}; saved" in text, text[-3000:]
    assert _latest(run_dir) == f"step_{stopped:08d}" and _leftovers(run_dir) == []
    if mode == "async":
        assert "saving step 2 in the background" in text and "saved step 2 (" in text
    _finish_and_compare(corpus, run_dir)


def _save_started(run_dir: Path, after: int) -> bool:
    folder = run_dir / "checkpoints"
    return any(int(p.name[5:13]) > after for p in folder.glob("step_*.tmp"))


def test_stop_signals_at_random_moments_of_saves(corpus, tmp_path):
    """Four runs on one run folder, each signalled (SIGUSR1 or SIGTERM, to the whole group)
    a random time after one of its saves began, somewhere in the save or just after it: every
    run stops with exit 4 on a saved step, never hangs, never leaves a ``.tmp``; the last
    resume follows the golden trace."""
    seed = int(os.environ.get("SODA_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    step = 0
    for attempt in range(4):
        sig = (signal.SIGUSR1, signal.SIGTERM)[attempt % 2]
        delay = rng.uniform(0.0, 0.25)
        why = f"seed {seed}, attempt {attempt}, {sig.name} {delay * 1000:.0f} ms into a save"
        run = Trainer(corpus, run_dir, "--run.save_interval=1")
        deadline = time.monotonic() + 300
        while not _save_started(run_dir, step) and run.proc.poll() is None:
            assert time.monotonic() < deadline, why
            time.sleep(0.0005)
        time.sleep(delay)
        if run.proc.poll() is None:
            run.signal_group(sig)
        code = run.finish()
        text = run.text()
        latest = _latest(run_dir)
        saved = int(latest[5:])
        assert _leftovers(run_dir) == [], (why, _leftovers(run_dir), text[-3000:])
        if saved == STEPS:  # the signal came after the last step: the run had finished
            assert code in (0, 4), (why, text[-3000:])
            break
        assert code == 4, (why, text[-3000:])
        assert f"stopped by {sig.name} after step {saved}; saved" in text, (why, text[-3000:])
        assert saved > step, why
        step = saved
    _finish_and_compare(corpus, run_dir)


def _group_alive(pgid: int) -> list[int]:
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return alive


def test_kill_9_during_a_background_write_keeps_latest_and_the_writer_dies_too(corpus, tmp_path):
    """kill -9 of the trainer while the background process of its step-2 save is writing (held
    open by the fault): the writer dies with it, ``latest`` still names step 1, and the resumed
    run follows the golden trace."""
    run_dir = tmp_path / "run"
    run = Trainer(corpus, run_dir, "--run.save_interval=1", fault=f"wait:0:write@2:{HANG_S}")
    run.wait_for_line("rank 0 step write@2: wait")
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while _group_alive(run.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_alive(run.proc.pid) == [], "a writer outlived its killed trainer"
    assert _latest(run_dir) == "step_00000001"
    _finish_and_compare(corpus, run_dir)


def test_a_save_waits_for_the_one_in_flight_and_says_how_long(corpus, tmp_path):
    """At most one save in flight: the write of step 2 is held for 4 s (no signal comes), the
    loop trains step 3 meanwhile, and step 3's save waits for step 2's to be published first."""
    run_dir = tmp_path / "run"
    run = Trainer(corpus, run_dir, "--run.save_interval=1", "--run.max_steps=3",
                  fault="wait:0:write@2:4")
    code = run.finish()
    text = run.text()
    assert code == 0, text[-3000:]
    assert "rank 0 step write@2: wait ended by the time limit" in text
    waited = re.search(r"the save of step 3 waited ([\d.]+) s for the write of step 2", text)
    assert waited is not None and float(waited[1]) > 0.5, text[-3000:]
    assert text.index("saved step 2 (") < text.index("saving step 3 in the background")
    assert _latest(run_dir) == "step_00000003" and _leftovers(run_dir) == []
