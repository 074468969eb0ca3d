"""Pruning by the chain ``latest`` leads to (no training: folders with the files pruning reads).

Each fake checkpoint has a ``trainer_state.json`` (``previous``, ``bad_steps``), one data file
and a ``manifest.json`` listing it with its size, as :mod:`soda_mega.checkpoint.save` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from soda_mega.checkpoint.resume import chain
from soda_mega.checkpoint.save import prune


def _fake(root: Path, step: int, previous: int | None, bad_steps: int = 0, legacy=False) -> Path:
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    state = {"step": step, "bad_steps": bad_steps}
    if not legacy:
        state["previous"] = None if previous is None else f"step_{previous:08d}"
    (folder / "trainer_state.json").write_text(json.dumps(state))
    (folder / "data.distcp").write_bytes(b"x" * 100)
    if not legacy:
        files = {n: {"size": (folder / n).stat().st_size, "xxh3_64": "0"}
                 for n in ("trainer_state.json", "data.distcp")}
        (folder / "manifest.json").write_text(json.dumps({"format": 1, "hash": "xxh3_64",
                                                          "files": files}))
    return folder


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*"))


def test_prune_follows_the_chain_not_the_step_numbers(tmp_path):
    # An abandoned timeline (steps 5, 6: 'latest' was pointed back at step 4) stays alone.
    for step, prev in ((1, None), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5)):
        _fake(tmp_path, step, prev)
    new = _fake(tmp_path, 7, 4)  # hypothetical: a run that resumed from 4 and saved 7
    assert [p.name for p in chain(tmp_path, new)] == ["step_00000007", "step_00000004",
                                                      "step_00000003", "step_00000002",
                                                      "step_00000001"]
    removed = prune(tmp_path, new, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_00000001", "step_00000002", "step_00000003"]
    assert _names(tmp_path) == ["step_00000004", "step_00000005", "step_00000006", "step_00000007"]


def test_a_damaged_checkpoint_does_not_count_as_kept(tmp_path):
    for step, prev in ((1, None), (2, 1), (3, 2)):
        _fake(tmp_path, step, prev)
    (tmp_path / "step_00000002" / "data.distcp").write_bytes(b"x" * 10)  # truncated
    new = _fake(tmp_path, 4, 3)
    prune(tmp_path, new, keep_last=3)
    assert _names(tmp_path) == ["step_00000001", "step_00000003", "step_00000004"]


def test_the_newest_is_kept_and_so_is_the_last_good_one_before_non_finite_steps(tmp_path):
    _fake(tmp_path, 1, None)
    _fake(tmp_path, 2, 1, bad_steps=0)
    _fake(tmp_path, 3, 2, bad_steps=1)
    new = _fake(tmp_path, 4, 3, bad_steps=2)
    prune(tmp_path, new, keep_last=1)
    assert _names(tmp_path) == ["step_00000002", "step_00000004"]
    # Once the run recovers, the protection lapses.
    recovered = _fake(tmp_path, 5, 4, bad_steps=0)
    prune(tmp_path, recovered, keep_last=1)
    assert _names(tmp_path) == ["step_00000005"]


def test_checkpoints_without_previous_chain_to_the_next_older_folder(tmp_path):
    for step in (1, 2, 3):
        _fake(tmp_path, step, None, legacy=True)
    new = _fake(tmp_path, 4, 3)
    prune(tmp_path, new, keep_last=2)
    assert _names(tmp_path) == ["step_00000003", "step_00000004"]
