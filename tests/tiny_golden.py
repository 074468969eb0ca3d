"""The golden tiny run: its corpus, its training options and its committed loss trace.

``tests/training/test_train_runs.py`` trains the ``tiny`` preset for 6 steps on this corpus and
checks the one-process trace against ``golden_tiny_trace.json``; the launcher tests under a real
Slurm (``tests/launchers/test_slurm_train.py``) run the same options through
``launchers/slurm.sbatch`` and compare with the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

STEPS = 6
SAVE_AT = 3
GOLDEN = Path(__file__).resolve().parent / "training" / "golden_tiny_trace.json"


def write_corpus(root: Path) -> Path:
    """The synthetic speech + text corpus (train and valid splits) of the golden run."""
    from soda_mega.config import load_config
    from soda_mega.data.write.synthetic import random_docs, write_split
    from soda_mega.tokens import VocabLayout

    layout = VocabLayout.from_config(load_config(preset="tiny").vocab)
    for name, kind, n in (("speech", "speech", 120), ("text", "text", 60)):
        write_split(root / name / "train", layout, random_docs(layout, n, 20, 300, 1, kind), kind)
        write_split(root / name / "valid", layout, random_docs(layout, 8, 20, 300, 2, kind), kind,
                    split="valid")
    return root


def run_overrides(corpus: Path, run_dir: Path) -> list[str]:
    """The golden run's ``--section.key=value`` options (with ``--preset tiny``)."""
    return [f"--data.train={corpus / 'speech'},{corpus / 'text'}", f"--run.dir={run_dir}",
            f"--run.max_steps={STEPS}", f"--run.save_interval={SAVE_AT}", "--run.eval_interval=3",
            "--run.eval_batches=2", "--run.log_interval=1", "--run.tensorboard=false",
            "--training.adam_eps=1e-8"]


def read_trace(run_dir: Path, kind: str = "train") -> list[dict]:
    """The ``kind`` records of ``run_dir/metrics.jsonl``."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def golden_trace() -> list[dict]:
    return json.loads(GOLDEN.read_text())


def assert_same_trace(got: list[dict], want: list[dict], rtol: float,
                      keys: tuple[str, ...] = ("loss", "grad_norm")) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=rtol), (key, a["step"], a[key], b[key])
