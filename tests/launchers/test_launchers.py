"""Launcher configs and dry runs: every preset resolves to a valid layout on 8-GPU nodes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from soda_mega.cli import main
from soda_mega.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "launchers" / "configs"
PRESETS = ("soda-135m", "soda-600m", "soda-1.7b", "soda-4b")


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_configs_follow_the_soda_recipe(preset):
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    assert cfg.model.name == preset
    assert cfg.training.global_batch_size == 512 and cfg.model.seq_length == 4096
    assert cfg.training.train_tokens == 5e11
    assert cfg.training.lr is None  # the SODA rule
    assert (cfg.training.adam_beta1, cfg.training.adam_beta2, cfg.training.adam_eps) == (0.98, 0.98, 1e-16)
    assert (cfg.training.weight_decay, cfg.training.z_loss, cfg.training.clip_grad) == (0.033, 1e-4, 1.0)
    assert (cfg.training.warmup_fraction, cfg.training.decay_fraction) == (0.1, 0.2)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("nodes", [1, 4])
def test_dry_run_prints_layout_and_memory(preset, nodes, capsys):
    world = 8 * nodes
    assert main(["train", "--config", str(CONFIGS / f"{preset}.yaml"), "--dry-run",
                 "--world-size", str(world)]) == 0
    out = capsys.readouterr().out
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    dp = world // (tp * pp)
    assert f"world {world} = TP {tp} x PP {pp} x DP {dp}" in out
    micro = 512 // (dp * cfg.training.micro_batch_size)
    assert f"{micro} micro-batches of {cfg.training.micro_batch_size} per replica" in out
    assert "steps 122071" in out or "steps 238419" in out
    total = float(re.search(r"total\s+([\d.]+) GiB", out).group(1))
    assert 0 < total < 80, f"{preset} would not fit an 80 GB H100: {total} GiB"


def test_dry_run_refuses_impossible_layouts(capsys):
    assert main(["train", "--config", str(CONFIGS / "soda-4b.yaml"), "--dry-run",
                 "--world-size", "3"]) == 2
    assert "world size 3 is not a multiple of TP x PP = 2" in capsys.readouterr().err


def test_torchrun_launcher_dry_run():
    env = dict(os.environ, CONFIG=str(CONFIGS / "soda-1.7b.yaml"), NGPUS="8")
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "torchrun.sh"), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "world 8 = TP 1 x PP 1 x DP 8" in proc.stdout


def test_slurm_script_parses():
    proc = subprocess.run(["bash", "-n", str(ROOT / "launchers" / "slurm.sbatch")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (ROOT / "launchers" / "slurm.sbatch").read_text()
    assert "--requeue" in text and "rdzv-endpoint" in text and "scontrol requeue" in text
