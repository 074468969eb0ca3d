"""``scaling sweep --launcher slurm`` under a real Slurm (tests/slurm_cluster.py): the job array
it writes and submits trains every run of a two-run micro grid (one array task each, torchrun
inside) and fills results.csv with the same final NLL as the local launcher."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch_env import clean_env
from soda_mega.cli import main
from tolerances import TRAINING_TRACE

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
# Two runs of the micro grid at one small budget (29 and 19 steps); the wider tokens-per-
# parameter band keeps the second width.
GRID = ["--grid", "micro", "--budgets", "2e11", "--widths", "32,48", "--tokens-per-param", "0.02:1.2"]


def _rows(path: Path) -> dict[str, dict]:
    with path.open(newline="") as handle:
        return {row["run_id"]: row for row in csv.DictReader(handle)}


def _grid(corpus: Path, out: Path) -> Path:
    assert main(["scaling", "grid", *GRID, "--out", str(out),
                 f"--data.train=[{corpus / 'speech'}, {corpus / 'text'}]"]) == 0
    return out / "manifest.json"


def test_slurm_sweep_fills_the_results_of_the_local_launcher(slurm_cluster, golden_corpus, tmp_path,
                                                              capsys):
    corpus = golden_corpus  # read only (tests/conftest.py)
    local = _grid(corpus, tmp_path / "local")
    on_slurm = _grid(corpus, tmp_path / "slurm")
    capsys.readouterr()

    env = slurm_cluster.environment(clean_env())
    submit = subprocess.run([sys.executable, "-m", "soda_mega.cli", "scaling", "sweep", str(on_slurm),
                             "--launcher", "slurm"], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr + slurm_cluster.logs()
    job = re.search(r"Submitted batch job (\d+)", submit.stdout)
    assert job, submit.stdout + submit.stderr
    # Meanwhile, the same runs one after another on this machine.
    assert main(["scaling", "sweep", str(local)]) == 0
    logs = sorted((on_slurm.parent / "logs").glob("*.out"))
    states = slurm_cluster.wait(job.group(1), 300, logs)
    logs = sorted((on_slurm.parent / "logs").glob("*.out"))
    assert states == ["COMPLETED", "COMPLETED"], slurm_cluster.report(job.group(1), logs)

    want, got = _rows(local.parent / "results.csv"), _rows(on_slurm.parent / "results.csv")
    assert sorted(got) == sorted(want) and len(want) == 2
    for run_id, row in want.items():
        assert got[run_id]["valid_step"] == row["valid_step"] == row["steps"]
        # One process either way (torchrun --nproc-per-node 1 inside the array task): the same
        # operations in the same order.
        assert float(got[run_id]["valid_loss"]) == pytest.approx(
            float(row["valid_loss"]), rel=TRAINING_TRACE["resume_rtol"]), run_id
