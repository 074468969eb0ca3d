"""Hostile environment values and arguments given to the scripts in launchers/ (issue 21, item 3).

The scripts take CONFIG, OUT, BUILD_ARGS, PYTHON, ports, counts and extra arguments from the
user's environment. Each test plants newlines, ``$(...)``, backticks and ``;`` in one of them and
runs the script with bash for real, in the modes that need no SLURM (``DRY_RUN=1``,
``--dry-run``, the checks made before the first srun): the marker file an injected command would
create must never appear; numbers that bash would evaluate as arithmetic (where ``a[$(cmd)]``
runs ``cmd``) are refused with exit 2 naming the variable; commands printed for the user to paste
split back into exactly the intended argv.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sec_build_helpers import MARKER, hostile_values

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = REPO / "launchers"


def _env(tmp_path: Path, **extra: str) -> dict:
    """A small environment: no SLURM variables but the ones given, the launch's cwd in tmp_path."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    return {**keep, "SLURM_SUBMIT_DIR": str(tmp_path), "PYTHON": sys.executable, **extra}


def _arith(marker: Path) -> list[str]:
    """Values that run ``touch marker`` when bash evaluates them in $(( )) or (( )) (the
    subscript of a set variable is evaluated even under ``set -u``)."""
    return [f"PWD[$(touch {marker})]", f"PWD[`touch {marker}`]", "1\n" + f"$(touch {marker})"]


def _argv_of(line: str, cwd: Path, shell: str = "bash") -> list[str]:
    """What ``shell`` makes of a printed command line: ``printf '%s\\0' <line>`` run for real."""
    proc = subprocess.run([shell, "-c", "printf '%s\\0' " + line], capture_output=True, cwd=cwd, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().split("\0")[:-1]


# ----------------------------------------------------------------------------- data_build.sbatch
@pytest.mark.parametrize("which", range(3))
def test_sec_launch_data_build_parts_is_a_number_not_an_expression(tmp_path, which):
    marker = tmp_path / MARKER
    env = _env(tmp_path, DRY_RUN="1", PARTS=_arith(marker)[which], OUT=str(tmp_path / "out"),
               BUILD_ARGS="--manifest m.jsonl", SODA_MEGA="soda-mega")
    proc = subprocess.run(["bash", str(LAUNCHERS / "data_build.sbatch")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert not marker.exists()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "PARTS" in proc.stderr and "whole number" in proc.stderr


def test_sec_launch_data_build_dry_run_prints_commands_that_paste_back_exactly(tmp_path):
    """OUT, SODA_MEGA and the extra arguments hold every hostile string (BUILD_ARGS is split at
    white space, so its hostile words have none); each printed command is one line and bash
    turns it into exactly the argv the array task runs."""
    marker = tmp_path / MARKER
    out = f"{tmp_path}/out\n$(touch {marker})"
    soda = f"{tmp_path}/bin;touch {marker}/soda-mega"
    words = [f"--manifest=$(touch${{IFS}}{marker})", f"`touch${{IFS}}{marker}`", f"x;touch${{IFS}}{marker}",
             f"'x\"&&touch${{IFS}}{marker}"]
    extra = hostile_values(tmp_path)
    env = _env(tmp_path, DRY_RUN="1", PARTS="2", OUT=out, BUILD_ARGS="  ".join(words), SODA_MEGA=soda)
    proc = subprocess.run(["bash", str(LAUNCHERS / "data_build.sbatch"), *extra], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    tasks = [line for line in lines if line.startswith("task ")]
    assert [t.split(":", 1)[0] for t in tasks] == ["task 0", "task 1"], proc.stdout
    for i, task in enumerate(tasks):
        assert _argv_of(task.split(": ", 1)[1], tmp_path) == [soda, "data", "build", out, *words, *extra,
                                                              "--part", f"{i}/2"]
    finalize = [soda, "data", "build", "--finalize", out]
    [by_hand] = [line for line in lines if line.startswith("# the last task to finish merges")]
    assert _argv_of(by_hand.split("otherwise: ", 1)[1], tmp_path) == finalize
    # the two submit lines: the array (its job id into JOB), then the merge that waits for it
    [array] = [line for line in lines if line.startswith("JOB=$(") and line.endswith(")")]
    assert _argv_of(array[len("JOB=$("):-1], tmp_path) == [
        "sbatch", "--array=0-1", "--parsable", "--export=ALL", str(LAUNCHERS / "data_build.sbatch"), *extra]
    [merge] = [line for line in lines if line.startswith("sbatch --dependency=")]
    *options, wrap = _argv_of(merge.replace('"$JOB"', "123", 1), tmp_path)
    assert options == ["sbatch", "--dependency=afterok:123", "--export=ALL", "--job-name=soda-data-finalize",
                       "--output=%x-%j.out"]
    assert wrap.startswith("--wrap=")
    # sbatch runs the --wrap command with /bin/sh (dash on Debian: no $'...' quoting)
    assert _argv_of(wrap[len("--wrap="):], tmp_path, shell="sh") == finalize
    assert not marker.exists()


# ----------------------------------------------------------------------------- slurm.sbatch
@pytest.mark.parametrize("var", ["MASTER_PORT", "GPUS_PER_NODE", "MAX_RESTARTS", "SHUTDOWN_TIMEOUT"])
@pytest.mark.parametrize("which", range(2))
def test_sec_launch_slurm_numbers_are_checked_before_any_arithmetic(tmp_path, var, which):
    """Refused before scontrol or srun is called (so no SLURM is needed to see it)."""
    marker = tmp_path / MARKER
    env = _env(tmp_path, CONFIG=str(tmp_path / "c.yaml"), SLURM_JOB_ID="9", SLURM_JOB_NODELIST="localhost",
               SLURM_NNODES="1", SODA_MEGA_STATUS_FILE=str(tmp_path / "status"), **{var: _arith(marker)[which]})
    proc = subprocess.run(["bash", str(LAUNCHERS / "slurm.sbatch")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert not marker.exists()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert var in proc.stderr and "whole number" in proc.stderr


def test_sec_launch_slurm_script_has_no_unquoted_expansion_of_user_values():
    """Every use of CONFIG, PYTHON and the extra arguments is inside double quotes."""
    text = (LAUNCHERS / "slurm.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(LAUNCHERS / "slurm.sbatch")]).returncode == 0
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for word in ("$CONFIG", "$PYTHON", "$@"):
            if word in line:
                assert f'"{word}"' in line or f'{word}"' in line, line


# ----------------------------------------------------------------------------- torchrun.sh
@pytest.mark.parametrize("var", ["NGPUS", "MASTER_PORT", "MAX_RESTARTS", "SHUTDOWN_TIMEOUT"])
def test_sec_launch_torchrun_numbers_are_checked(tmp_path, var):
    marker = tmp_path / MARKER
    env = _env(tmp_path, CONFIG=str(tmp_path / "c.yaml"), PYTHON="true",
               **{"NGPUS": "1", var: _arith(marker)[0]})
    proc = subprocess.run(["bash", str(LAUNCHERS / "torchrun.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert not marker.exists()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert var in proc.stderr and "whole number" in proc.stderr


def test_sec_launch_torchrun_hands_config_and_arguments_over_unchanged(tmp_path):
    """A hostile CONFIG and extra arguments reach `soda-mega train --dry-run` as plain values: the
    trainer names the config file it could not find, exactly as given."""
    marker = tmp_path / MARKER
    config = f"{tmp_path}/c $(touch {marker})\n`touch {marker}`;.yaml"
    env = _env(tmp_path, CONFIG=config, NGPUS="1")
    extra = [f"--run.dir={v}" for v in hostile_values(tmp_path)]
    proc = subprocess.run(["bash", str(LAUNCHERS / "torchrun.sh"), "--dry-run", *extra], capture_output=True,
                          text=True, env=env, timeout=120)
    assert not marker.exists()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert repr(config)[1:-1] in proc.stderr or config in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- scaling_micro_sweep.sh
@pytest.mark.parametrize("data", ["runs/a, /elsewhere/corpus", "runs/a]x", "runs/a\n$(touch {marker})",
                                  "runs/a#b", "runs/'a'"])
def test_sec_launch_micro_sweep_data_must_fit_the_train_list(tmp_path, data):
    """DATA goes into `--data.train=[DATA/speech, DATA/text]`: a comma or bracket would add or cut
    list entries, so such a DATA is refused before anything runs (PYTHON=true: nothing would)."""
    marker = tmp_path / MARKER
    env = _env(tmp_path, PYTHON="true", OUT=str(tmp_path / "out"), DATA=data.format(marker=marker))
    proc = subprocess.run(["bash", str(LAUNCHERS / "scaling_micro_sweep.sh")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert not marker.exists()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "DATA" in proc.stderr and "== grid" not in proc.stdout
