"""The suite's own scheduling (tests/conftest.py): under pytest-xdist each test module runs whole
on one worker (its module fixtures are built once), every real-Slurm test runs on the same
worker (they share one session cluster and its ports), and the longest work starts first.
``--setup-plan`` places the tests without running them or their fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from launch_env import clean_env

TESTS = Path(__file__).resolve().parent
SLURM = ["tests/data/test_build_slurm.py", "tests/launchers/test_slurm_train.py",
         "tests/scaling/test_sweep_slurm.py"]
OTHERS = ["tests/tokens/test_layout.py", "tests/config/test_config.py",
          "tests/training/test_train_runs.py"]


def test_modules_stay_whole_and_the_slurm_tests_share_one_worker(tmp_path):
    log = tmp_path / "workers.txt"
    env = {**clean_env(), "SODA_WORKER_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "worker_log", "-n", "2",
                           "--setup-plan", "-q", "-p", "no:cacheprovider", *OTHERS, *SLURM],
                          cwd=TESTS.parent, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [line.split(" ", 1) for line in log.read_text().splitlines()]
    workers = defaultdict(set)
    for worker, nodeid in runs:
        workers[nodeid.split("::")[0]].add(worker)
    assert set(workers) == set(OTHERS + SLURM)
    assert all(len(w) == 1 for w in workers.values()), dict(workers)
    assert len(set().union(*(workers[m] for m in SLURM))) == 1, dict(workers)
    assert {w for w, _ in runs} == {"gw0", "gw1"}
    # The longest first: the Slurm tests and test_train_runs (given last and in the middle) are
    # the first two units handed out, one to each worker.
    firsts = {}
    for worker, nodeid in runs:
        firsts.setdefault(worker, nodeid.split("::")[0])
    assert OTHERS[2] in firsts.values() and set(firsts.values()) <= {OTHERS[2], *SLURM}, firsts
