"""Issue 33.11: a dataset written with mosaicml-streaming's own MDSWriter, following only the
README ("Writing a dataset without `data build`"), inspects, verifies and loads.

The README's code block is run as written, so the documentation and this test cannot drift."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np

from soda_mega.cli import main
from soda_mega.config import load_config
from soda_mega.data.read.loader import SodaDataLoader
from soda_mega.data.read.source import DocumentSource

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "### Writing a dataset without `data build`"


def _readme_block() -> str:
    text = README.read_text()
    assert SECTION in text, "the README lost its section on writing a dataset by hand"
    section = text.split(SECTION, 1)[1].split("\n### ", 1)[0]
    [block] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def test_the_readme_recipe_writes_a_dataset_that_inspects_and_loads(tmp_path, capsys):
    out = tmp_path / "handmade"
    exec(compile(_readme_block(), str(README), "exec"), {"OUT": str(out)})  # noqa: S102

    assert main(["data", "inspect", str(out), "--verify"]) == 0, capsys.readouterr()
    assert "verify: OK" in capsys.readouterr().out
    assert main(["data", "inspect", str(out)]) == 0, capsys.readouterr().err
    report = capsys.readouterr().out
    assert "train: 2 documents" in report and "valid: absent" in report
    assert "<BOS> 'first document' <EOS>" in report

    source = DocumentSource(out, "train")
    tokens, mask = source.get(1)
    assert bytes(tokens[1:-1].tolist()) == b"second one" and mask.all()

    cfg = load_config(preset="tiny", overrides=[f"--data.train={out}", "--model.seq_length=16",
                                                "--training.global_batch_size=2",
                                                "--training.micro_batch_size=2", "--data.num_workers=0"])
    loader = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True)
    batches = list(itertools.islice(iter(loader), 3))
    assert batches and all(np.asarray(b["tokens"]).shape[-1] == 16 for b in batches)
