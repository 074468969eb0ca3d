"""Issue 33.2: a built dataset whose valid split is empty (a few records at the default
``data.valid_fraction=0.01``) inspects, verifies and trains; validation leaves that dataset out,
said once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from build_helpers import random_codes, tiny_config, write_manifest
from soda_mega.cli import main
from soda_mega.data.read.source import DocumentSource, EmptySplitError, MissingSplitError
from soda_mega.data.schema import META_FILE
from soda_mega.data.write.builder import build_dataset, summary_lines

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_golden import write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """Six recordings at the default valid fraction: everything lands in train."""
    tmp = tmp_path_factory.mktemp("small")
    lines = []
    for i in range(6):
        np.save(tmp / f"r{i}.npy", random_codes(i, 60))
        lines.append({"id": f"r{i}", "codes": f"r{i}.npy", "transcript": f"recording number {i}"})
    manifest = write_manifest(tmp / "m.jsonl", lines)
    result = build_dataset(tmp / "ds", [manifest], "speech", tiny_config("--data.valid_fraction=0.01"),
                           show_progress=False)
    assert result.splits["valid"]["num_docs"] == 0 and result.splits["train"]["num_docs"] == 12
    assert "training skips validation of this dataset" in summary_lines(result)[-1]
    return tmp / "ds"


def test_an_empty_valid_split_inspects_and_verifies(small, capsys):
    assert json.loads((small / "valid" / META_FILE).read_text())["num_docs"] == 0
    with pytest.raises(EmptySplitError, match="the valid split holds no documents"):
        DocumentSource(small, "valid")
    assert issubclass(EmptySplitError, MissingSplitError)
    for args in ([], ["--split", "train"]):
        assert main(["data", "inspect", str(small), *args]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert "train: 12 documents" in out and "valid: empty" in out and "document 0 of train" in out
    assert main(["data", "inspect", str(small), "--verify"]) == 0, capsys.readouterr()
    assert "verify: OK" in capsys.readouterr().out


def _train(datasets: list[Path], run_dir: Path) -> tuple[int, str]:
    return main(["train", "--preset", "tiny", f"--data.train={','.join(map(str, datasets))}",
                 f"--run.dir={run_dir}", "--run.max_steps=2", "--run.eval_interval=1", "--run.eval_batches=1",
                 "--run.save_interval=0", "--run.log_interval=1", "--run.tensorboard=false",
                 "--data.num_workers=0"])


def _valid_records(run_dir: Path) -> int:
    return sum('"kind": "valid"' in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def test_training_leaves_the_empty_valid_split_out_said_once(small, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    assert _train([corpus / "speech", small], tmp_path / "run") == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert out.count("validation leaves out a dataset") == 1, out
    assert f"{small / 'valid'}: the valid split holds no documents" in out
    assert _valid_records(tmp_path / "run") == 2  # the other dataset is still validated

    # the only dataset: validation is off, said once, and the run trains
    assert _train([small], tmp_path / "alone") == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert out.count("validation is off") == 1 and "holds no documents" in out
    assert _valid_records(tmp_path / "alone") == 0
