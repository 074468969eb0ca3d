"""bench_checkpoint runs end to end in smoke mode (a subprocess: it builds a trainer, which
initialises torch.distributed) and reports both kinds of save from one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch_env import clean_env

pytestmark = pytest.mark.distributed

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_checkpoint.py"


def test_bench_checkpoint_smoke_reports_sync_and_async_saves(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_checkpoint_cpu_smoke.json").read_text())
    assert result["preset"] == "tiny" and result["provenance"]["commit"]
    sync, background = result["rows"]
    assert (sync["mode"], background["mode"]) == ("sync", "async")
    # Checkpoints of the same model and optimizer (the trainer state's digits aside).
    assert abs(sync["bytes"] - background["bytes"]) < 1000 and sync["bytes"] > 10e6
    assert sync["blocked_s"] == pytest.approx(sync["save_s"], abs=1e-3)
    # The loop trained while the background write ran, and was not blocked for all of it.
    assert background["steps_meanwhile"] >= 1
    assert background["blocked_s"] < background["save_s"]
    assert result["stall_ratio"] == pytest.approx(
        result["async_blocked_s_median"] / result["sync_save_s_median"])
    md = (tmp_path / "bench_checkpoint_cpu_smoke.md").read_text()
    assert md.startswith("# Checkpoint save stall: tiny (") and "| async | 0 |" in md
    assert "saved step 1 (" in proc.stdout and "saved step 2 (" in proc.stdout
