"""The set-up of ``soda-mega eval nll`` walks down once: the pre-flight opens each dataset's
split (and derives the checkpoint's vocabulary layout) once, and the evaluation reads that same
opened split instead of opening and checking the datasets again."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from call_counts import count_calls
from checkpoint_helpers import make_tiny_checkpoint, tiny_config


def test_eval_nll_opens_each_split_once_and_derives_the_vocabulary_once(tmp_path, monkeypatch,
                                                                        capsys):
    from soda_mega.cli import main
    from soda_mega.data.read.source import DocumentSource
    from soda_mega.data.write.synthetic import random_docs, write_split
    from soda_mega.tokens.layout import VocabLayout

    layout = VocabLayout.from_config(tiny_config().vocab)
    for name, kind, seed in (("speech", "speech", 1), ("text", "text", 2)):
        write_split(tmp_path / name / "valid", layout, random_docs(layout, 8, 40, 300, seed, kind),
                    kind, split="valid")
    checkpoint = make_tiny_checkpoint(tmp_path / "ckpt", 0)

    opened: Counter = Counter()
    layouts: Counter = Counter()
    count_calls(monkeypatch, DocumentSource, "__init__",
                lambda self, root, split="train", *a, **k: (Path(root).name, split), opened)
    count_calls(monkeypatch, VocabLayout, "from_config", lambda cls, vocab: "layout", layouts)
    rc = main(["eval", "nll", str(checkpoint), "--data", str(tmp_path / "speech"),
               str(tmp_path / "text"), "--max-batches", "2", "--quiet", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert '"windows": 4' in out.out  # two micro-batches of the tiny preset's 2 windows
    assert dict(opened) == {("speech", "valid"): 1, ("text", "valid"): 1}
    assert layouts["layout"] == 1
