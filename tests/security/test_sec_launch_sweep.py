"""Hostile values on their way into `scaling sweep`'s launch commands (issue 21, item 3).

A scaling manifest may come from elsewhere; its fields, the command's options and the config
overrides reach ``sweep.sbatch`` (a bash script that ``sbatch`` runs) and the torchrun command
lines. Each test plants newlines, ``$(...)``, backticks and ``;`` in one such field, then runs
what was generated with bash for real: the marker file an injected command would create must
never appear, and the command bash would run must be exactly the intended argv. Fields that must
be plain names (the grid name, run ids, run folders) are refused with exit 2 naming the field.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sec_build_helpers import MARKER, hostile_values
from soda_mega.cli import main
from soda_mega.scaling.grid import base_config, load_grid, plan_grid, write_grid
from soda_mega.scaling.manifest import read_manifest
from soda_mega.scaling.sweep import slurm_script, train_command

REPO = Path(__file__).resolve().parents[2]
# Hostile strings without "/" (usable as a file or folder name): the marker lands in the
# current folder of whatever shell runs them.
NAMES = ["x\ntouch " + MARKER + "\n#", "$(touch " + MARKER + ")", "`touch " + MARKER + "`", "x;touch " + MARKER,
         "x'y;touch " + MARKER, 'x"y$(touch ' + MARKER + ')', "x&&touch " + MARKER]


def _markers(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob(MARKER)] + [p for p in (REPO / MARKER,) if p.exists()]


def _manifest(folder: Path) -> Path:
    spec = load_grid("micro", {"budgets": [1e12]})
    return write_grid(plan_grid(spec, base_config(spec)), folder, {"config": None})


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _run_script(script: Path, cwd: Path, task: int = 3) -> list[str]:
    """Run a generated sweep.sbatch with bash, its `"$PYTHON" -m soda_mega.cli ...` line turned
    into `printf '%s\\0' "$PYTHON" -m soda_mega.cli ...`: the argv bash builds for that command."""
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert text.count('"$PYTHON" -m soda_mega.cli') == 1, text
    probe = script.with_name("probe.sh")
    probe.write_text(text.replace('"$PYTHON" -m soda_mega.cli', "printf '%s\\0' \"$PYTHON\" -m soda_mega.cli"))
    env = {"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "77"}
    proc = subprocess.run(["bash", str(probe)], capture_output=True, cwd=cwd, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().split("\0")[:-1]


def _run_generated_if_any(root: Path, cwd: Path) -> None:
    """A refused sweep writes no script; if one was written, run it as sbatch would."""
    script = root / "sweep.sbatch"
    if script.exists():
        env = {"PATH": "/usr/bin:/bin", "PYTHON": "true", "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "1"}
        subprocess.run(["bash", str(script)], capture_output=True, cwd=cwd, env=env, timeout=60)


@pytest.mark.parametrize("value", NAMES + ["has space", "", "a/b", "-x"])
def test_sec_launch_grid_name_is_refused_unless_plain(tmp_path, monkeypatch, capsys, value):
    monkeypatch.chdir(tmp_path)
    path = _manifest(tmp_path / "sweep")
    _edit(path, lambda d: d["grid"].__setitem__("name", value))
    rc = main(["scaling", "sweep", str(path), "--launcher", "slurm", "--nproc", "2", "--dry-run"])
    _run_generated_if_any(path.parent, tmp_path)
    assert not _markers(tmp_path)
    assert rc == 2
    err = capsys.readouterr().err
    assert "grid.name" in err and len(err.strip().splitlines()) == 1, err
    assert not (path.parent / "sweep.sbatch").exists()


@pytest.mark.parametrize("field,value", [("run_id", NAMES[0]), ("run_id", NAMES[1]), ("run_id", "../../up"),
                                         ("run_dir", "runs/" + NAMES[2]), ("run_dir", "../../outside"),
                                         ("run_dir", "/abs/run"), ("config", "../../elsewhere.yaml"),
                                         ("config", "configs/" + NAMES[3] + ".yaml"), ("steps", NAMES[1]),
                                         ("hidden_size", "64"), ("budget", None)])
@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_sec_launch_run_fields_must_be_plain_and_inside(tmp_path, monkeypatch, capsys, field, value, launcher):
    monkeypatch.chdir(tmp_path)
    path = _manifest(tmp_path / "sweep")
    _edit(path, lambda d: d["runs"][0].__setitem__(field, value))
    rc = main(["scaling", "sweep", str(path), "--launcher", launcher, "--dry-run"])
    _run_generated_if_any(path.parent, tmp_path)
    assert not _markers(tmp_path)
    assert rc == 2
    err = capsys.readouterr().err
    assert f"runs[0].{field}" in err and len(err.strip().splitlines()) == 1, err


def test_sec_launch_sweep_script_carries_hostile_values_as_plain_arguments(tmp_path, monkeypatch):
    """Overrides, the results path, the current folder and the Python path hold every hostile
    string; the script's command is exactly the intended argv and runs nothing else."""
    cwd = tmp_path / ("cwd " + NAMES[0] + NAMES[1])
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    manifest = read_manifest(_manifest(tmp_path / "sweep"))
    overrides = [f"--data.train={v}" for v in hostile_values(tmp_path) + NAMES]
    results = tmp_path / ("results " + NAMES[4] + ".csv")
    python = str(tmp_path / ("py " + NAMES[1]) / "python")
    script = manifest.root / "sweep.sbatch"
    script.write_text(slurm_script(manifest, results, nproc=2, overrides=overrides, max_parallel=2,
                                   time_limit="1-02:03:04", python=python))
    argv = _run_script(script, tmp_path)
    assert argv == [python, "-m", "soda_mega.cli", "scaling", "sweep", str(manifest.path.resolve()),
                    "--results", str(results.resolve()), "--index", "3", "--launcher", "torchrun",
                    "--nproc", "2", *overrides]
    assert not _markers(tmp_path)


@pytest.mark.parametrize("option,value,field", [("--time", "1:00:00\ntouch " + MARKER, "--time"),
                                                ("--time", "$(touch " + MARKER + ")", "--time"),
                                                ("--max-parallel", "-1", "--max-parallel"),
                                                ("--max-parallel", "0", "--max-parallel")])
def test_sec_launch_sbatch_options_are_checked(tmp_path, monkeypatch, capsys, option, value, field):
    monkeypatch.chdir(tmp_path)
    path = _manifest(tmp_path / "sweep")
    rc = main(["scaling", "sweep", str(path), "--launcher", "slurm", "--dry-run", option, value])
    _run_generated_if_any(path.parent, tmp_path)
    assert not _markers(tmp_path)
    assert rc == 2
    err = capsys.readouterr().err
    assert field in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("folder", ["sweep\ntouch " + MARKER, "sweep $(touch " + MARKER + ")", 'sw"eep',
                                    "sweep%j"])
def test_sec_launch_manifest_folder_unfit_for_an_sbatch_line_is_refused(tmp_path, monkeypatch, capsys, folder):
    """The folder is written into `#SBATCH --output=`, which sbatch parses itself (no shell
    quoting there): a name it would misread is refused, naming the folder."""
    monkeypatch.chdir(tmp_path)
    path = _manifest(tmp_path / folder)
    rc = main(["scaling", "sweep", str(path), "--launcher", "slurm", "--dry-run"])
    _run_generated_if_any(path.parent, tmp_path)
    assert not _markers(tmp_path)
    assert rc == 2
    err = capsys.readouterr().err
    assert "manifest folder" in err and len(err.strip().splitlines()) == 1, err


def test_sec_launch_printed_train_commands_run_as_the_intended_argv(tmp_path, monkeypatch, capsys):
    """`scaling sweep --dry-run` prints the torchrun command of each run; pasted into bash, the
    line is exactly the argv the sweep would run, hostile overrides included."""
    monkeypatch.chdir(tmp_path)
    path = _manifest(tmp_path / ("sweep " + NAMES[1]))
    manifest = read_manifest(path)
    overrides = [f"--data.train={v}" for v in hostile_values(tmp_path)]
    assert main(["scaling", "sweep", str(path), "--launcher", "torchrun", "--nproc", "2", "--dry-run",
                 "--index", "0", *overrides]) == 0
    out = capsys.readouterr().out
    header, command = out.split("\n", 1)  # "# <run id> (to run)", then the command (quoted
    assert header.startswith(f"# {manifest.runs[0].run_id} ")  # newlines stay inside its quotes)
    intended = train_command(manifest, manifest.runs[0], "torchrun", 2, overrides)
    assert intended[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert shlex.split(command) == intended
    proc = subprocess.run(["bash", "-c", "printf '%s\\0' " + command], capture_output=True, cwd=tmp_path,
                          timeout=30)
    assert proc.stdout.decode().split("\0")[:-1] == intended
    assert not _markers(tmp_path)


def test_sec_launch_train_command_keeps_hostile_overrides_as_single_arguments(tmp_path):
    manifest = read_manifest(_manifest(tmp_path / "sweep"))
    overrides = [f"--data.train={v}" for v in hostile_values(tmp_path)]
    argv = train_command(manifest, manifest.runs[0], "torchrun", 2, overrides, python=sys.executable)
    assert argv[-len(overrides):] == overrides
    assert argv.count("--config") == 1 and sum(a.startswith("--run.dir=") for a in argv) == 1


@pytest.mark.parametrize("name", [NAMES[0], "my grid"])
def test_sec_launch_grid_yaml_name_is_refused_before_any_file_is_written(tmp_path, capsys, name):
    """The grid name heads every run config written by `scaling grid` (a YAML comment line): a
    newline there would add config lines to every run."""
    grid = tmp_path / "grid.yaml"
    micro = REPO / "soda_mega" / "scaling" / "grids" / "micro.yaml"
    grid.write_text(micro.read_text().replace("name: micro", "name: " + json.dumps(name)))
    assert main(["scaling", "grid", "--grid", str(grid), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "grid.name" in err and "not a plain name" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
