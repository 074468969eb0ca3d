"""Whole training runs through the CLI: layouts, kill -9 + resume, resharding, divergence.

All runs train the ``tiny`` model on one small synthetic corpus for 6 steps and are compared
with the single-process run of the same seed through their ``metrics.jsonl`` loss traces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_env import clean_env
from tiny_golden import GOLDEN, SAVE_AT, STEPS, assert_same_trace, read_trace, run_overrides
from tolerances import PARALLEL_FP32, TRAINING_TRACE

pytestmark = pytest.mark.distributed


def _env() -> dict:
    return clean_env()


def _args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", *run_overrides(corpus, run_dir), *extra]


def _train(corpus, run_dir, *extra, procs=1, check=True):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(procs), "-m", "soda_mega.cli"] if procs > 1
                else [sys.executable, "-m", "soda_mega.cli"])
    proc = subprocess.run(launcher + _args(corpus, run_dir, *extra), capture_output=True,
                          text=True, env=_env(), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


_trace = read_trace


@pytest.fixture(scope="module")
def corpus(golden_corpus):
    """The session's golden corpus (read only; tests/conftest.py)."""
    return golden_corpus


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    _train(corpus, run_dir)
    return run_dir


TP2 = ["--parallel.tensor_parallel=2"]


@pytest.fixture(scope="module")
def tp2_run(corpus, tmp_path_factory):
    """The TP=2 run (2 processes), trained once: the layout test compares its trace, the
    resume test copies its step-3 checkpoint; both only read it."""
    run_dir = tmp_path_factory.mktemp("tp2")
    _train(corpus, run_dir, *TP2, procs=2)
    return run_dir


_assert_same_trace = assert_same_trace


def test_reference_run_logs_everything(reference):
    train = _trace(reference)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    first = train[0]
    for key in ("loss", "loss_text", "loss_semantic", "loss_acoustic", "grad_norm", "lr",
                "tokens_per_s", "tflops_per_gpu", "consumed_tokens"):
        assert key in first, key
    assert not any(r["skipped"] for r in train)
    valid = _trace(reference, "valid")
    assert [r["step"] for r in valid] == [3, 6]
    assert all(r["valid_loss"] > 0 for r in valid)
    assert (reference / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    assert (reference / "config.yaml").is_file()


@pytest.mark.parametrize("layout", [
    TP2,
    ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=true"],
    ["--parallel.pipeline_parallel=2"],
    [],  # DP=2 with the distributed optimizer
], ids=["tp2", "tp2_sp", "pp2", "dp2"])
def test_two_process_layouts_follow_the_one_process_trace(corpus, reference, tmp_path, layout,
                                                         request):
    if layout == TP2:
        run_dir = request.getfixturevalue("tp2_run")  # the run the TP=2 resume test starts from
    else:
        run_dir = tmp_path
        _train(corpus, run_dir, *layout, procs=2)
    _assert_same_trace(_trace(run_dir), _trace(reference), TRAINING_TRACE["rtol"])
    _assert_same_trace(_trace(run_dir, "valid"), _trace(reference, "valid"),
                       PARALLEL_FP32["loss_rtol"], keys=("valid_loss",))


def test_kill_9_then_resume_continues_the_same_trace(corpus, reference, tmp_path):
    cmd = [sys.executable, "-m", "soda_mega.cli"] + _args(corpus, tmp_path, "--run.save_interval=1")
    # A session of its own, so the kill also takes the checkpoint writer's helper process.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "checkpoints" / f"step_{SAVE_AT:08d}").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    assert latest.startswith("step_") and int(latest[5:]) < STEPS, "the kill came too late"
    _train(corpus, tmp_path, "--run.save_interval=1")
    _assert_same_trace(_trace(tmp_path), _trace(reference), TRAINING_TRACE["resume_rtol"])


def test_tp2_checkpoint_resumes_on_one_process(corpus, tp2_run, tmp_path):
    tp2 = tp2_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tp2 / "checkpoints" / f"step_{SAVE_AT:08d}",
                    resumed / "checkpoints" / f"step_{SAVE_AT:08d}")
    (resumed / "checkpoints" / "latest").write_text(f"step_{SAVE_AT:08d}")
    _train(corpus, resumed)
    got, want = _trace(resumed), _trace(tp2)[SAVE_AT:]
    # The first step after loading runs the very weights the TP=2 run had at that step.
    assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=PARALLEL_FP32["loss_rtol"])
    _assert_same_trace(got, want, TRAINING_TRACE["rtol"])


def test_resume_refuses_another_model(corpus, reference, tmp_path):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    proc = _train(corpus, tmp_path, "--model.num_layers=2", check=False)
    assert proc.returncode != 0
    assert "model.num_layers: checkpoint 4 != config 2" in proc.stderr


def test_non_finite_steps_are_skipped_then_stop_the_run(corpus, tmp_path):
    proc = _train(corpus, tmp_path, "--training.lr=1e30", "--training.warmup_fraction=0",
                  "--run.max_bad_steps=2", "--training.clip_grad=0", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "consecutive steps had a non-finite loss or gradient norm" in proc.stderr
    trace = _trace(tmp_path)
    assert [r["skipped"] for r in trace][-2:] == [True, True]
    assert not trace[0]["skipped"]


def test_fused_torch_loss_path_trains_like_megatron(corpus, reference, tmp_path):
    """kernels.loss=torch (chunked vocab-parallel CE, never the full logits) follows the same
    trace as Megatron's loss; the Triton kernels are compared with it at model level under the
    interpreter in tests/kernels (a CPU training run through the interpreter takes minutes)."""
    _train(corpus, tmp_path, "--kernels.loss=torch")
    _assert_same_trace(_trace(tmp_path), _trace(reference), TRAINING_TRACE["rtol"])


def test_reference_trace_matches_the_committed_golden_trace(reference):
    """Any change to initialisation, data order, loss or optimizer shows up here.

    Regenerate deliberately with ``SODA_UPDATE_GOLDEN=1 pytest tests/training -k golden``
    and explain the change in the commit message.
    """
    trace = [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"], "lr": r["lr"]}
             for r in _trace(reference)]
    if os.environ.get("SODA_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(trace, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    _assert_same_trace(trace, golden, TRAINING_TRACE["golden_rtol"], keys=("loss", "grad_norm", "lr"))
