"""A small corpus and one short training run shared by the checkpoint tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch_env import clean_env


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from soda_mega.config import load_config
    from soda_mega.data.write.synthetic import random_docs, write_split
    from soda_mega.tokens import VocabLayout

    root = tmp_path_factory.mktemp("ckpt-corpus")
    layout = VocabLayout.from_config(load_config(preset="tiny").vocab)
    for name, kind, n in (("speech", "speech", 60), ("text", "text", 30)):
        write_split(root / name / "train", layout, random_docs(layout, n, 20, 300, 1, kind), kind)
        write_split(root / name / "valid", layout, random_docs(layout, 8, 20, 300, 2, kind), kind,
                    split="valid")
    return root


def train_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", f"--data.train={corpus / 'speech'},{corpus / 'text'}",
            f"--run.dir={run_dir}", "--run.eval_interval=0", "--run.log_interval=1",
            "--run.tensorboard=false", *extra]


def train(corpus: Path, run_dir: Path, *extra: str, check: bool = True, timeout: int = 300):
    proc = subprocess.run([sys.executable, "-m", "soda_mega.cli", *train_args(corpus, run_dir, *extra)],
                          capture_output=True, text=True, env=clean_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def train_run(corpus, tmp_path_factory) -> Path:
    """A 2-step run with its one checkpoint (step 2); copy it before changing anything."""
    run = tmp_path_factory.mktemp("ckpt-run")
    train(corpus, run, "--run.max_steps=2", "--run.save_interval=0")
    return run


@pytest.fixture(scope="session")
def three_saves(corpus, tmp_path_factory) -> Path:
    """A 3-step run with a checkpoint after every step; copy it before changing anything."""
    run = tmp_path_factory.mktemp("ckpt-three")
    train(corpus, run, "--run.max_steps=3", "--run.save_interval=1", "--run.keep_checkpoints=3")
    return run


def copy_run(source: Path, dest: Path) -> Path:
    """``source`` with its large files as hard links (cheap): change those only through
    :func:`rewrite`, never in place."""
    import os
    import shutil

    def copy(src, dst):
        if os.path.getsize(src) > 1 << 20:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=copy)
    return dest


def rewrite(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def trace(run: Path, kind: str = "train") -> list[dict]:
    import json

    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]
