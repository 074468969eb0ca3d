"""The sweep runner with an injected fake trainer: results recorded, finished runs skipped,
a failing run reported without stopping the others; launch commands and the SLURM script."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import subprocess
from pathlib import Path

import pytest

from soda_mega.cli import main
from soda_mega.scaling.grid import base_config, load_grid, plan_grid, write_grid
from soda_mega.scaling.manifest import ManifestError, read_manifest
from soda_mega.scaling.results import COLUMNS
from soda_mega.scaling.sweep import append_result, run_sweep, slurm_script, train_command


@pytest.fixture
def manifest(tmp_path):
    spec = load_grid("micro", {"budgets": [1e12, 2.5e12]})
    path = write_grid(plan_grid(spec, base_config(spec)), tmp_path / "sweep", {"config": None})
    return read_manifest(path)


class FakeTrainer:
    """Stands in for `soda-mega train`: writes metrics.jsonl with a final validation record.

    ``fail`` run ids exit 3 (as a diverged run does); ``stop_early`` ones exit 0 but validate
    before their last step.
    """

    def __init__(self, manifest, fail=(), stop_early=()):
        self.steps = {r.run_id: r.steps for r in manifest.runs}
        self.fail, self.stop_early, self.calls = set(fail), set(stop_early), []

    def __call__(self, argv, log_path, env):
        run_dir = Path(next(a for a in argv if a.startswith("--run.dir=")).split("=", 1)[1])
        run_id = run_dir.name
        self.calls.append(run_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"fake training of {run_id}\n")
        if run_id in self.fail:
            return 3
        step = self.steps[run_id] - (1 if run_id in self.stop_early else 0)
        records = [{"kind": "train", "step": step, "loss": 4.0},
                   {"kind": "valid", "step": step, "valid_loss": 3.0 + len(run_id) / 100}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return 0


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_sweep_records_skips_and_survives_a_failure(manifest):
    results = manifest.root / "results.csv"
    ids = [r.run_id for r in manifest.runs]
    assert len(ids) == 6
    bad = ids[1]
    out = io.StringIO()
    first = FakeTrainer(manifest, fail={bad})
    report = run_sweep(manifest, results, runner=first, out=out)
    assert first.calls == ids                      # the failure did not stop the others
    assert report.done == [i for i in ids if i != bad]
    assert [f[0] for f in report.failed] == [bad] and not report.ok
    log = manifest.run_dir(manifest.runs[1]) / "train.log"
    assert str(log) in report.failed[0][1]
    text = out.getvalue()
    assert f"{bad}: FAILED" in text and str(log) in text and "5 done, 0 skipped, 1 failed" in text
    rows = _rows(results)
    assert [r["run_id"] for r in rows] == report.done
    assert list(rows[0]) == list(COLUMNS)
    assert float(rows[0]["valid_loss"]) == pytest.approx(3.0 + len(ids[0]) / 100)
    assert int(rows[0]["valid_step"]) == manifest.runs[0].steps

    second = FakeTrainer(manifest)
    report = run_sweep(manifest, results, runner=second, out=io.StringIO())
    assert second.calls == [bad]                   # only the unfinished run is relaunched
    assert len(report.skipped) == 5 and report.ok
    assert sorted(r["run_id"] for r in _rows(results)) == sorted(ids)


def test_a_run_without_a_final_validation_fails(manifest):
    results = manifest.root / "results.csv"
    early = manifest.runs[0].run_id
    report = run_sweep(manifest, results, indices=[0, 2], runner=FakeTrainer(manifest, stop_early={early}),
                       out=io.StringIO())
    assert [f[0] for f in report.failed] == [early]
    assert "not at the run's last step" in report.failed[0][1]
    assert [r["run_id"] for r in _rows(results)] == [manifest.runs[2].run_id]


def test_train_commands(manifest):
    run = manifest.runs[0]
    local = train_command(manifest, run, "local", overrides=["--data.train=[x]"], python="py")
    assert local[:4] == ["py", "-m", "soda_mega.cli", "train"]
    assert local[5] == str(manifest.config_path(run).resolve())
    assert f"--run.dir={manifest.run_dir(run).resolve()}" in local and local[-1] == "--data.train=[x]"
    torchrun = train_command(manifest, run, "torchrun", nproc=4, python="py")
    assert torchrun[:7] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m"]
    assert torchrun[7:9] == ["soda_mega.cli", "train"]


def test_slurm_script_is_valid_bash(manifest):
    script = slurm_script(manifest, manifest.root / "results.csv", nproc=8,
                          overrides=["--data.train=[a b, c]"], max_parallel=4, time_limit="12:00:00")
    n = len(manifest.runs)
    assert f"#SBATCH --array=0-{n - 1}%4" in script and "#SBATCH --gpus-per-node=8" in script
    assert '--index "$SLURM_ARRAY_TASK_ID" --launcher torchrun --nproc 8' in script
    assert "'--data.train=[a b, c]'" in script and "scontrol requeue" in script
    path = manifest.root / "check.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_sweep_command_dry_runs(manifest, capsys):
    assert main(["scaling", "sweep", str(manifest.path), "--launcher", "slurm", "--dry-run", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-5" in out and (manifest.root / "sweep.sbatch").is_file()
    assert main(["scaling", "sweep", str(manifest.path), "--dry-run", "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert manifest.runs[1].run_id in out and "soda_mega.cli train --config" in out
    assert main(["scaling", "sweep", str(manifest.path), "--index", "9"]) == 2
    assert "outside the manifest's 6 runs" in capsys.readouterr().err


def test_bad_manifest_is_reported(tmp_path, capsys):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"runs": []}))
    with pytest.raises(ManifestError, match="not a scaling manifest"):
        read_manifest(path)
    assert main(["scaling", "sweep", str(tmp_path / "nope.json")]) == 2
    assert "no such manifest" in capsys.readouterr().err


def _append_many(path: str, worker: int) -> None:
    for i in range(40):
        append_result(Path(path), {"run_id": f"w{worker}-{i}", "budget": 1.0, "valid_loss": 2.0,
                                   "run_dir": "x" * 300})


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "results.csv"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join()
    rows = _rows(path)
    assert len(rows) == 160 and len({r["run_id"] for r in rows}) == 160
    assert all(r["run_dir"] == "x" * 300 for r in rows)
    assert path.read_text().count("run_id") == 1   # one header
