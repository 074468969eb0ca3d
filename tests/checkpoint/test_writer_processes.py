"""Saving starts no long-lived helper process.

Megatron's file writer, by default, hands results over a queue served by a *spawned*
``multiprocessing`` manager: a second Python process (~290 MB) that stays alive for minutes
after a trainer is killed with SIGKILL. soda-mega's synchronous saves use an in-process queue.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch_env import clean_env

pytestmark = pytest.mark.distributed  # launches a subprocess

SCRIPT = """
import sys, psutil
sys.path.insert(0, {tests!r})
from checkpoint_helpers import make_tiny_checkpoint
make_tiny_checkpoint({out!r})
spawned = [p.cmdline() for p in psutil.Process().children(recursive=True)
           if any("spawn_main" in part for part in p.cmdline())]
print("SPAWNED", spawned)
"""


def test_a_save_leaves_no_spawned_manager_process(tmp_path):
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests, out=str(tmp_path / "c"))],
                          capture_output=True, text=True, env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SPAWNED []" in proc.stdout, proc.stdout[-2000:]
