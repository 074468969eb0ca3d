"""`data build` leaves no process behind when it is killed (kill -9: an OOM killer, a scheduler).

Its codec workers are spawned interpreters that hold both ends of their work queue: without a
parent-death signal they outlived a killed build (reparented to init, still holding memory and,
on a GPU node, a device), and a rerun of the same part competed with them."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from build_helpers import codes_corpus

GONE_WITHIN_S = 20
# CPU a spawned worker may spend in all when its build is killed as it starts: Python's start-up
# and the light modules that carry its arguments. Importing torch alone takes more, and a worker
# that set up first (torch, its codec) outlived a killed build by over 20 s on a loaded machine.
STARTUP_CPU_S = 1.0


def _workers(pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cpu_seconds(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def test_killed_build_takes_its_workers_with_it(tmp_path):
    manifest = codes_corpus(tmp_path / "in", n=40)
    build = subprocess.Popen(
        [sys.executable, "-m", "soda_mega.cli", "data", "build", "--manifest", str(manifest),
         str(tmp_path / "out"), "--preset", "tiny", "--workers", "2",
         "--data.build_unit_recordings=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[psutil.Process] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(workers) < 2 and build.poll() is None:
            workers = _workers(build.pid)
            time.sleep(0.05)
        assert len(workers) == 2, "the build did not start its 2 workers"
        build.kill()
        build.wait()
        deadline = time.time() + GONE_WITHIN_S
        cpu = {w.pid: 0.0 for w in workers}
        while time.time() < deadline and any(map(_alive, workers)):
            for w in workers:
                cpu[w.pid] = max(cpu[w.pid], _cpu_seconds(w))
            time.sleep(0.02)
        left = [w.pid for w in workers if _alive(w)]
        assert not left, f"workers {left} outlived the killed build by {GONE_WITHIN_S} s"
        # They end as soon as they start: the parent-death signal comes before any set-up.
        assert max(cpu.values()) < STARTUP_CPU_S, f"CPU seconds of each worker before it ended: {cpu}"
    finally:
        for w in workers:
            if _alive(w):
                w.kill()
