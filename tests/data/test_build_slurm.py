"""launchers/data_build.sbatch as a real Slurm job array (tests/slurm_cluster.py): three array
tasks build their parts into one folder, a dependent job (``--dependency=afterok``) runs
``data build --finalize``, and the dataset equals the one-machine build byte for byte."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from build_helpers import codes_corpus, tree_bytes
from launch_env import clean_env
from soda_mega.cli import main

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launchers" / "data_build.sbatch"
OPTIONS = ["--preset", "tiny", "--quiet", "--data.build_workers=0", "--data.valid_fraction=0.3",
           "--data.build_unit_recordings=2"]


def test_array_of_three_parts_and_a_dependent_finalize_equal_the_one_machine_build(
        slurm_cluster, tmp_path):
    manifest = codes_corpus(tmp_path / "in", n=11)  # 6 units of 2 recordings: 2 per part
    single = tmp_path / "single"
    assert main(["data", "build", str(single), "--manifest", str(manifest), *OPTIONS]) == 0

    # The command the script runs (SODA_MEGA): this interpreter, so the code under test.
    command = tmp_path / "soda-mega"
    command.write_text(f'#!/bin/sh\nexec {sys.executable} -m soda_mega.cli "$@"\n')
    command.chmod(0o755)
    out = tmp_path / "parts"
    env = {**clean_env(), "OUT": str(out), "SODA_MEGA": str(command),
           "BUILD_ARGS": " ".join(["--manifest", str(manifest), *OPTIONS])}
    # The script's own #SBATCH --output: soda-data-build-<job>_<task>.out in the folder sbatch
    # ran in (the repository, removed below); the finalize job's output goes to tmp_path.
    array = slurm_cluster.sbatch("--array=0-2", str(SBATCH), env=env, cwd=REPO)
    finalize = slurm_cluster.sbatch(f"--dependency=afterok:{array}", "--job-name=finalize",
                                    f"--output={tmp_path}/finalize.out",
                                    f"--wrap={command} data build --finalize {out} --quiet",
                                    env=env, cwd=REPO)
    outputs = [REPO / f"soda-data-build-{array}_{i}.out" for i in range(3)]
    outputs.append(tmp_path / "finalize.out")
    try:
        states = slurm_cluster.wait(array, 300, outputs)
        assert states == ["COMPLETED"] * 3, slurm_cluster.report(array, outputs)
        assert slurm_cluster.wait(finalize, 120, outputs) == ["COMPLETED"], \
            slurm_cluster.report(finalize, outputs)
        for i in range(3):
            assert f"task {i} of 3 -> {out}" in outputs[i].read_text()
        assert tree_bytes(out) == tree_bytes(single)
    finally:
        for path in outputs[:3]:
            path.unlink(missing_ok=True)
