"""Issue 32 item 6: one run folder, one training run at a time.

Before the fix a second ``train`` on a run folder whose first run still ran (a resubmitted
job) went ahead: the two deleted each other's ``step_N.tmp``, moved each other's checkpoints to
``replaced/`` and lost metrics rows. Now the run folder's lock (``run.dir/run.lock``: host, pid,
job and start time, and an ``fcntl`` lock on it) refuses the second run on every rank with exit
2 and one line naming the holder; the lock of a holder that is gone (killed on this host, an
earlier attempt of the same SLURM job, a heartbeat stopped long ago) is taken over.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sec_ckpt_helpers import _child_env, tiny_dataset

pytestmark = pytest.mark.distributed  # launches the CLI in a subprocess

REPO = Path(__file__).resolve().parents[2]

_HOLD = """
import sys, time
from pathlib import Path
from soda_mega.training.run_lock import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock (as a running trainer's rank 0 does)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE,
                            text=True, env=_child_env(), cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _train_args(data: Path, run_dir: Path) -> list[str]:
    return ["train", "--preset", "tiny", f"--data.train={data}", f"--run.dir={run_dir}",
            "--run.max_steps=1", "--run.tensorboard=false", "--run.eval_interval=0"]


def test_a_second_run_stops_on_every_rank_and_a_killed_holder_is_taken_over(tmp_path):
    data = tiny_dataset(tmp_path / "ds")
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        # Two ranks through launchers/torchrun.sh: both stop naming the holder (none hangs or
        # trains) and the launcher reports rank 0's exit 2.
        config = tmp_path / "config.yaml"
        config.write_text("preset: tiny\n")
        env = {**_child_env(), "CONFIG": str(config), "NGPUS": "2", "PYTHON": sys.executable,
               "MAX_RESTARTS": "0"}
        proc = subprocess.run(["bash", str(REPO / "launchers" / "torchrun.sh"),
                               *_train_args(data, run_dir)[3:]],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 2, text[-4000:]
        errors = [line for line in text.splitlines() if "soda-mega: error:" in line]
        # One line per rank (torchrun may stop rank 1 before it prints, once rank 0 has ended).
        assert errors and len(errors) <= 2, text[-4000:]
        assert "soda-mega: stopped (exit 2): error: " in text, text[-4000:]
        for line in errors:
            assert f"pid {holder.pid}" in line and str(run_dir / "run.lock") in line, line
            assert socket.gethostname() in line, line
        assert "soda_mega/" not in text, text[-4000:]  # no traceback of soda-mega's code
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed (kill -9): its lock is taken over (a whole resumed run after a
    # killed rank 0 is tests/training/test_runtime_faults.py's hung-rank restart).
    from soda_mega.training.run_lock import RunLock

    lock = RunLock(run_dir).acquire()
    try:
        assert "took over" in lock.note and f"pid {holder.pid}" in lock.note, lock.note
    finally:
        lock.release()


# --------------------------------------------------------------------- the lock's own rules
def _plant(run_dir: Path, **owner) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    record = {"host": socket.gethostname(), "pid": 1, "slurm": None, "attempt": [0, 0, 0],
              "started": time.time(), **owner}
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("owner", [
    {"host": "another-node"},                                        # heartbeat fresh
    {"host": "another-node", "slurm": "77", "attempt": [0, 1, 0]},      # a later attempt of our job
    {"slurm": "88"},                                                    # pid 1 runs: alive here
])
def test_a_live_holder_is_respected(tmp_path, monkeypatch, owner):
    from soda_mega.training.run_lock import RunFolderBusy, RunLock

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SODA_MEGA_ATTEMPT", "0")
    path = _plant(tmp_path, **owner)
    with pytest.raises(RunFolderBusy, match="pid 1 on"):
        RunLock(tmp_path).acquire()
    assert json.loads(path.read_text())["pid"] == 1


@pytest.mark.parametrize("owner", [
    {"host": "another-node", "slurm": "77", "attempt": [0, 0, 0]},   # our job's earlier attempt
    {"host": "another-node", "slurm": "77", "attempt": [1, 0, 0]},   # ... before a requeue
    {"host": "another-node", "stale": True},                        # heartbeat long stopped
    {"pid": 2 ** 22 + 12345},                                       # this host, no such process
])
def test_a_gone_holder_is_taken_over(tmp_path, monkeypatch, owner):
    from soda_mega.training.run_lock import RunLock

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SODA_MEGA_ATTEMPT", "1")
    stale = owner.pop("stale", False)
    path = _plant(tmp_path, **owner)
    if stale:
        os.utime(path, (0, 0))
    lock = RunLock(tmp_path).acquire()
    try:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert "took over" in lock.note
    finally:
        lock.release()
    assert path.exists() and not path.read_text()  # released: kept, empty


def test_an_fcntl_lock_of_a_live_process_wins_over_a_file_that_names_a_dead_one(tmp_path):
    """The two checks: a lock file that names a gone pid while another process holds its fcntl
    lock (a holder on another host of a file system whose fcntl locks work) is busy."""
    from soda_mega.training.run_lock import RunFolderBusy, RunLock

    holder = _holder(tmp_path)
    try:
        _plant(tmp_path, pid=2 ** 22 + 12345)  # rewrites the content in place, keeps the inode
        with pytest.raises(RunFolderBusy, match="run.lock"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(tmp_path).acquire().release()
