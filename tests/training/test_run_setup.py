"""The set-up of ``soda-mega train`` walks down once: each split of each dataset is opened once
(index, lengths, shard totals, layout check) and the vocabulary layout is derived from the
config once, however many validations the run makes.

Runs the real ``train`` command in this process (``soda_mega.cli.main``) on the golden tiny
corpus for 2 steps with a validation after each, counting the real constructors as they run.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from call_counts import count_calls
from tiny_golden import run_overrides, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("setup-corpus"))


def test_train_opens_each_split_once_and_derives_the_vocabulary_once(corpus, tmp_path, monkeypatch,
                                                                     capsys):
    from soda_mega.cli import main
    from soda_mega.data.read.order import StreamOrder
    from soda_mega.data.read.source import DocumentSource
    from soda_mega.tokens.layout import VocabLayout

    opened: Counter = Counter()
    orders: Counter = Counter()
    layouts: Counter = Counter()
    count_calls(monkeypatch, DocumentSource, "__init__",
                lambda self, root, split="train", *a, **k: (Path(root).name, split), opened)
    count_calls(monkeypatch, StreamOrder, "__init__",
                lambda self, lengths, *a, **k: len(lengths), orders)
    count_calls(monkeypatch, VocabLayout, "from_config", lambda cls, vocab: "layout", layouts)

    run_dir = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", *run_overrides(corpus, run_dir), "--run.max_steps=2",
               "--run.eval_interval=1", "--run.save_interval=2", "--data.num_workers=0"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    valid = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"kind": "valid"' in line]
    assert len(valid) == 2, "the run must validate twice for this test to mean anything"

    assert dict(opened) == {("speech", "train"): 1, ("text", "train"): 1,
                            ("speech", "valid"): 1, ("text", "valid"): 1}
    # One order per stream of the train split and one per stream of the valid split.
    assert sum(orders.values()) == 4, orders
    assert layouts["layout"] == 1


def test_dry_run_derives_the_vocabulary_once(monkeypatch, capsys):
    from soda_mega.cli import main
    from soda_mega.tokens.layout import VocabLayout

    layouts: Counter = Counter()
    count_calls(monkeypatch, VocabLayout, "from_config", lambda cls, vocab: "layout", layouts)
    assert main(["train", "--preset", "tiny", "--parallel.tensor_parallel=2", "--dry-run",
                 "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "world 4 = TP 2 x PP 1 x DP 2" in out
    assert layouts["layout"] == 1
    # the planner's rank of this layout (issue 36), from the same vocabulary
    assert re.search(r"soda-mega plan \(H100 SXM 80GB, predicted\): this layout ranks \d+ of \d+", out)


def test_dry_run_plan_takes_its_layout_from_the_resolved_run(monkeypatch, capsys):
    """Issue 35: the memory plan of ``train --dry-run`` reads the padded vocabulary, DP size and
    micro-batches from the command's ResolvedRun instead of deriving them again: the padding
    is computed by ``resolve_run`` (and the parameter accounting, a model-level function of the
    layout), never by ``training/plan.py``."""
    import sys

    from soda_mega.cli import main
    from soda_mega.tokens.layout import VocabLayout

    callers: Counter = Counter()
    # key: the module of the function that asked for the padding (frame 2: past the key and
    # the spy itself).
    count_calls(monkeypatch, VocabLayout, "padded_size",
                lambda *a, **k: sys._getframe(2).f_globals["__name__"], callers)
    assert main(["train", "--preset", "tiny", "--parallel.tensor_parallel=2", "--dry-run",
                 "--world-size", "4"]) == 0
    assert "world 4 = TP 2 x PP 1 x DP 2" in capsys.readouterr().out
    # resolve_run pads once for the run's own layout (and once per layout the planner ranks
    # for the dry-run's rank line, issue 36); the memory plan itself never does
    assert callers["soda_mega.run.resolved"] >= 1, callers
    assert "soda_mega.training.plan" not in callers, callers
