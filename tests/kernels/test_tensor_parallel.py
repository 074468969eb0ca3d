"""TP=2 (2 gloo processes, one torchrun launch; see tp_worker.py) equals TP=1 for both kernels,
the plain-PyTorch reference and Megatron's vocab-parallel cross-entropy, and for the ``tiny``
model with the kernels wired in (with and without sequence parallelism)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tolerances import KERNEL_ORACLE, KERNEL_REORDER_FP32, PARALLEL_FP32

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")
sys.path.insert(0, os.path.dirname(__file__))
from test_flce_gpu_configs import NUM_CONFIGS  # noqa: E402
from tp_worker import FLCE_CASES, MODEL_CASES  # noqa: E402

pytestmark = pytest.mark.distributed
ATOL = KERNEL_REORDER_FP32["atol"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels_tp2")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           WORKER, "--out-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("impl", ["triton", "torch", "triton_torchgemm", "triton_train",
                                  "torch_train", "triton_torchgemm_train", "reference"])
@pytest.mark.parametrize("case", list(FLCE_CASES))
def test_linear_cross_entropy_tp2_equals_tp1(ranks, case, impl):
    for rank in ranks:
        r = rank[f"{case}/{impl}"]
        assert r["loss"] <= ATOL
        assert r["grad_hidden"] <= PARALLEL_FP32["grad_rel"]
        assert r["grad_weight"] <= PARALLEL_FP32["grad_rel"]
        if impl != "reference":
            assert r["lse"] <= ATOL and r["group_loss"] <= ATOL * 10 and r["group_tokens_equal"]


@pytest.mark.parametrize("case", list(FLCE_CASES))
def test_linear_cross_entropy_tp2_equals_megatron(ranks, case):
    for rank in ranks:
        assert rank[f"{case}/megatron"]["loss"] <= ATOL


@pytest.mark.parametrize("index", range(NUM_CONFIGS))
def test_every_gpu_config_tp2_matches_the_fp64_oracle(ranks, index):
    """Each GPU autotune config, pinned and interpreted, on both ranks' shards (ragged last
    slices, masked rows) within the fp32 oracle rule of the TP=1 test."""
    for rank in ranks:
        r = rank[f"gpu_config{index}"]
        for key, err in r["ours"].items():
            assert err <= r["torch_fp32"][key] + KERNEL_ORACLE["fp32"][key], (key, r)


def test_measured_loss_plan_is_the_same_on_both_ranks(ranks):
    """Whatever each rank's cache holds, the ranks measure together (or read the same cached
    answer) and run the same design: the MAX over ranks of each candidate's time decides."""
    sources = {"none_cached": "measured", "rank0_cached": "measured",
               "caches_disagree": "measured", "both_cached": "cache"}
    for scenario, source in sources.items():
        got = [rank["measure"][scenario] for rank in ranks]
        assert [g["source"] for g in got] == [source, source], (scenario, got)
        assert got[0]["design"] == got[1]["design"], (scenario, got)
        if source == "measured":
            assert got[0]["times"] == got[1]["times"] and len(got[0]["times"]) == 2


def test_embedding_tp2_equals_tp1(ranks):
    for rank in ranks:
        r = rank["embedding"]
        assert r["out"] == 0 and r["grad_weight"] == 0 and r["modality_equal"]


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_tiny_model_with_kernels_tp2_equals_tp1(ranks, case):
    for rank in ranks:
        r = rank[case]
        assert r["params"] > 30, "every parameter must be compared"
        assert r["token_loss"] <= ATOL
        assert r["group_loss"] <= ATOL * 10 and r["group_tokens_equal"]
        assert r["grad_rel"] <= PARALLEL_FP32["grad_rel"], f"{r['worst']} off by {r['grad_rel']:.2e}"
