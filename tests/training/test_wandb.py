"""Weights & Biases output: an offline W&B run holds the records of metrics.jsonl, and a
resumed run continues the same W&B run id (runs of the tiny model through the CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch_env import clean_env
from soda_mega.config import load_config
from soda_mega.data.write.synthetic import random_docs, write_split
from soda_mega.tokens import VocabLayout
from soda_mega.training.wandb_log import ID_FILE, WandbLogger

pytest.importorskip("wandb")


def _corpus(root: Path) -> Path:
    layout = VocabLayout.from_config(load_config(preset="tiny").vocab)
    write_split(root / "speech" / "train", layout, random_docs(layout, 60, 20, 300, 1, "speech"), "speech")
    write_split(root / "speech" / "valid", layout, random_docs(layout, 6, 20, 300, 2, "speech"), "speech",
                split="valid")
    return root / "speech"


def _train(data: Path, run_dir: Path, steps: int) -> None:
    env = clean_env()
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    args = [sys.executable, "-m", "soda_mega.cli", "train", "--preset", "tiny",
            f"--data.train={data}", f"--data.valid={data}", f"--run.dir={run_dir}",
            f"--run.max_steps={steps}", "--run.save_interval=2", "--run.log_interval=1",
            "--run.eval_interval=2", "--run.eval_batches=1", "--run.tensorboard=false",
            "--run.wandb_project=soda-test", "--run.wandb_tags=[ci,tiny]"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"


def _wandb_rows(run_dir: Path) -> tuple[list[str], list[dict]]:
    from wandb_records import history, run_ids

    ids, rows = [], []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        ids += run_ids(path)
        rows += history(path)
    return ids, rows


def test_offline_wandb_run_holds_the_metrics_and_resume_continues_it(tmp_path):
    data = _corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    _train(data, run_dir, steps=2)
    run_id = json.loads((run_dir / ID_FILE).read_text())["id"]
    _train(data, run_dir, steps=4)  # resumes from step 2
    assert json.loads((run_dir / ID_FILE).read_text())["id"] == run_id

    ids, rows = _wandb_rows(run_dir)
    assert len(ids) == 2 and set(ids) == {run_id}, ids  # two processes, one W&B run

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for kind in ("train", "valid"):
        want = {r["step"]: r for r in records if r["kind"] == kind}
        loss_key = "loss" if kind == "train" else "valid_loss"
        got = {int(r["step"]): r for r in rows if f"{kind}/{loss_key}" in r}
        assert sorted(got) == sorted(want) and want, (kind, sorted(got), sorted(want))
        for step, rec in want.items():
            assert got[step][f"{kind}/{loss_key}"] == pytest.approx(rec[loss_key], rel=1e-12)
    train = [r for r in rows if "train/loss" in r]
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert all(key in r for r in train), key


def test_no_project_no_wandb(tmp_path):
    run_cfg = load_config(preset="tiny").run
    assert WandbLogger.open(tmp_path, run_cfg, {}, resumed=False) is None
    assert not (tmp_path / ID_FILE).exists()


def test_missing_package_is_announced_not_fatal(tmp_path, monkeypatch, capsys):
    run_cfg = load_config(preset="tiny", overrides=["--run.wandb_project=x"]).run
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert WandbLogger.open(tmp_path, run_cfg, {}, resumed=False) is None
    assert "wandb` package is not installed" in capsys.readouterr().err
