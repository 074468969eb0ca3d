"""Loader state in O(1) and a closed-form, shard-aware plan (issue 12, items 2 and 4)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from soda_mega.config import load_config
from soda_mega.data.read.loader import SodaDataLoader
from soda_mega.data.read.order import StreamOrder
from soda_mega.data.read.steps import StepPlan
from soda_mega.data.write.synthetic import random_docs, write_split
from soda_mega.tokens import VocabLayout

SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    layout = VocabLayout.from_config(load_config(preset="tiny").vocab)
    for name, kind, n, seed in (("a", "speech", 50, 1), ("b", "text", 40, 2)):
        write_split(root / name / "train", layout, random_docs(layout, n, 5, 90, seed, kind), kind)
    return root


def _cfg(root, *extra):
    return load_config(preset="tiny", overrides=[
        f"--data.train={root / 'a'},{root / 'b'}", f"--model.seq_length={SEQ}",
        "--training.global_batch_size=4", "--training.micro_batch_size=2", "--data.num_workers=0",
        "--data.shuffle_window=2", *extra])


def _work(loader) -> int:
    plan = loader.plan
    built = getattr(plan, "steps_built", 0) + getattr(plan, "windows_planned", 0)
    return built + sum(o.blocks_built for o in plan.orders)


@pytest.mark.parametrize("steps", [10, 1000, 1_000_000])
def test_state_dict_and_resume_cost_do_not_grow_with_the_step(corpus, steps):
    """Saving at step N replays nothing; resuming at step N computes only step N's windows."""
    loader = SodaDataLoader(_cfg(corpus), dp_rank=0, dp_size=1, needs_data=True)
    state = loader.state_dict()
    state["steps"] = steps  # exactly what a run saves at that step (the step number)
    resumed = SodaDataLoader(_cfg(corpus), dp_rank=0, dp_size=1, needs_data=True)
    resumed.load_state_dict(state)
    before = _work(resumed)
    assert resumed.state_dict()["steps"] == steps
    assert _work(resumed) == before, "state_dict() must not plan anything"
    batches = list(itertools.islice(iter(resumed), 2))  # one whole step
    assert _work(resumed) - before <= 12, "the first step after a resume replays history"
    assert resumed.state_dict()["steps"] == steps + 1
    assert all(b["tokens"].shape == (2, SEQ) for b in batches)


def test_whole_packing_state_dict_is_a_snapshot(corpus):
    loader = SodaDataLoader(_cfg(corpus, "--data.packing=whole"), dp_rank=0, dp_size=1,
                            needs_data=True)
    it = iter(loader)
    costs = []
    for _ in range(3):
        list(itertools.islice(it, 2 * 5))  # five more steps
        before = loader._position.windows_planned + loader.plan.windows_planned
        loader.state_dict()
        costs.append(loader._position.windows_planned + loader.plan.windows_planned - before)
    assert costs == [0, 0, 0]


def test_jump_equals_walk_and_other_dp_and_workers(corpus):
    """Windows of step N are the same computed directly, after walking, on 2 DP ranks, with workers."""
    walk = SodaDataLoader(_cfg(corpus), dp_rank=0, dp_size=1, needs_data=True)
    walked = list(itertools.islice(iter(walk), 2 * 7))[-2:]  # step 6
    state = walk.state_dict()
    state["steps"] = 6
    halves = []
    for rank, workers in ((0, 2), (1, 0)):
        jump = SodaDataLoader(_cfg(corpus), dp_rank=rank, dp_size=2, needs_data=True,
                              num_workers=workers)
        jump.load_state_dict(state)
        halves += list(itertools.islice(iter(jump), 1))
    assert torch.equal(torch.cat([b["tokens"] for b in halves]),
                       torch.cat([b["tokens"] for b in walked]))


def _orders(lengths, counts, window, seed=0):
    return [StreamOrder(np.asarray(lengths), counts, seed, 0, window)]


def test_packed_stream_keeps_documents_whole_and_each_once_per_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 300)
    counts = [30] * 10
    plan = StepPlan(_orders(lengths, counts, 3), [1.0], 16, 4)
    pieces = [p for w in range(int(lengths.sum()) // 16) for p in plan.window(w)]
    # consecutive pieces of one document are contiguous; documents appear in whole runs
    seen, current = [], None
    for _s, d, a, b in pieces:
        if current is None or d != current[0]:
            assert a == 0, "a document must start at its first token"
            seen.append(d)
        else:
            assert a in (current[1], current[1] - 1), "pieces of a document must be contiguous"
        current = (d, b)
    first_epoch = seen[:len(set(seen))]
    assert len(set(first_epoch)) == len(first_epoch) >= 250


def test_shard_window_bounds_the_shards_in_use():
    lengths = np.full(4000, 10)
    counts = [100] * 40
    plan = StepPlan(_orders(lengths, counts, 4), [1.0], 50, 8)
    for step in range(0, 90, 7):
        used = plan.shards(step * 8, (step + 1) * 8)[0]
        assert len(used) <= 8, used  # within one block of 4 shards, or across two at a boundary
    glob = StepPlan(_orders(lengths, counts, 0), [1.0], 50, 8)
    assert len(glob.shards(0, 8)[0]) == 40
