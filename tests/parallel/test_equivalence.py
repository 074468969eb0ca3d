"""Tensor, sequence, pipeline (1F1B and interleaved) and data parallelism equal one process.

A single process (TP=PP=DP=1) runs the ``tiny`` model on one global batch of 4 micro-batches
and saves its weights and gradients. Then 2 gloo processes build every layout from the same
seed (which must give exactly the same weights) and run the same batch (one torchrun launch
for all cases, since starting Megatron costs seconds), and each rank compares its loss and
every local gradient shard with the matching slice of the single-process gradient. A negative
control (sequence parallelism without the TP all-reduce of norm gradients) must be caught.
See equivalence_worker.py for the cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch_env import clean_env
from tolerances import BROKEN_MIN_ERROR, PARALLEL_FP32

WORKER = os.path.join(os.path.dirname(__file__), "equivalence_worker.py")
sys.path.insert(0, os.path.dirname(__file__))
from equivalence_worker import CASES  # noqa: E402

pytestmark = pytest.mark.distributed


def _run(cmd: list[str], timeout: int = 600) -> None:
    env = clean_env()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("equivalence")
    ref = str(out / "reference.pt")
    _run([sys.executable, WORKER, "--reference", "--ref-file", ref])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          WORKER, "--ref-file", ref, "--out-dir", str(out)])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    by_case: dict[str, list[dict]] = {}
    for rank in ranks:
        for item in rank["results"]:
            by_case.setdefault(item["case"], []).append(item)
    return ranks[0]["reference_loss"], ranks[0]["reference_tokens"], by_case, ranks[0]["reference_grad_norm"]


def _loss_of(items: list[dict], split_over_dp: bool) -> tuple[float, int]:
    last = [r for r in items if r["is_last_stage"]]
    if split_over_dp:
        # Each DP replica saw half the batch: combine sums and counts.
        total = sum(r["loss_sum"] for r in last)
        tokens = sum(r["num_tokens"] for r in last)
        return total / tokens, tokens
    return last[0]["loss_sum"] / last[0]["num_tokens"], last[0]["num_tokens"]


@pytest.mark.parametrize("case", [c for c, (_, _, ok) in CASES.items() if ok])
def test_layout_matches_single_process(results, case):
    ref_loss, ref_tokens, by_case, ref_norm = results
    items = by_case[case]
    assert len(items) == 2, "both ranks must report"
    loss, tokens = _loss_of(items, split_over_dp=CASES[case][1] == "dp")
    assert tokens == ref_tokens
    assert loss == pytest.approx(ref_loss, rel=PARALLEL_FP32["loss_rtol"])
    for item in items:
        assert item["grad_rel_err"], "rank compared no gradients"
        worst = max(item["grad_rel_err"], key=item["grad_rel_err"].get)
        err = item["grad_rel_err"][worst]
        assert err <= PARALLEL_FP32["grad_rel"], f"{case} rank {item['layout']}: {worst} off by {err:.2e}"
    if case.endswith("_fused_loss"):  # the training path ran (no recompute of the logits)
        for item in items:
            expected = ["grad_hidden", "grad_weight", "logits"] if item["is_last_stage"] else []
            assert item["loss_matmuls"] == expected, (item["layout"], item["loss_matmuls"])
    # The optimizer's global gradient norm (used for clipping) is layout-independent too.
    for item in items:
        assert item["grad_norm"] == pytest.approx(ref_norm, rel=PARALLEL_FP32["grad_rel"])
    # Every parameter of the model must have been compared on some rank.
    compared = set().union(*(item["grad_rel_err"] for item in items))
    reference_names = set().union(*(i["grad_rel_err"] for i in by_case["tp2"]))
    assert compared == reference_names


def test_same_seed_gives_same_weights_in_every_layout(results):
    _, _, by_case, _ = results
    for case, items in by_case.items():
        for item in items:
            assert item["init_rel_err"] == 0.0, f"{case}: fresh shards differ from the TP=1 weights"


def test_broken_sequence_parallel_is_detected(results):
    _, _, by_case, _ = results
    worst = max(max(item["grad_rel_err"].values()) for item in by_case["tp2_sp_broken"])
    assert worst > BROKEN_MIN_ERROR
