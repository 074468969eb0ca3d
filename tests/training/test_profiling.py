"""Profiler breakdown: the classification rules on hand-made traces (CPU and GPU shaped, shares
computed by hand), and `soda-mega profile` end to end on the tiny preset (CPU, not timed)."""

from __future__ import annotations

import json

import pytest

from soda_mega.perf.profiling import CATEGORIES, breakdown, name_rule


def X(name, ts, dur, cat="cpu_op", tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur,
            "args": args}


def test_rules_on_a_cpu_trace_by_hand():
    events = [
        X("soda/step", 0, 1000, cat="user_annotation"),
        # forward: a range decides; the op's sequence number links its backward
        X("soda/attention", 10, 100, cat="user_annotation"),
        X("aten::scaled_dot_product_attention", 20, 80, **{"Sequence number": 5}),
        X("aten::_flash_attention_forward", 30, 60),
        X("aten::mm", 120, 100),                                         # name rule: matmul
        # backward: a node with no telling name gets its forward op's category
        X("autograd::engine::evaluate_function: WeirdBackward0", 300, 100, **{"Sequence number": 5}),
        X("aten::mul", 310, 80),
        X("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 400, 50),
        X("gloo:all_reduce", 450, 50, cat="user_annotation"),           # communication
        X("aten::broadcast_tensors", 500, 10),                          # a shape op, not a collective
        X("soda/loss", 600, 100, cat="user_annotation"),
        X("aten::exp", 610, 80),
        X("aten::silu", 700, 50),                                       # other
        X("aten::mm", 1200, 100),                                       # outside the step: ignored
        {"ph": "i", "name": "[memory]", "ts": 5, "pid": 1, "tid": 1, "args": {}},
    ]
    result = breakdown({"traceEvents": events})
    us = {k: round(v * 1e6, 6) for k, v in result["seconds"].items()}
    assert us == {"attention": 20 + 20 + 60 + 20 + 80, "matmul": 100, "optimizer": 50,
                  "communication": 50, "other": 10 + 50, "loss": 20 + 80, "embedding": 0,
                  "norm": 0, "idle": 1000 - 560}
    assert result["window_seconds"] == pytest.approx(1e-3)
    assert sum(result["share"].values()) == pytest.approx(1.0)
    assert result["share"]["idle"] == pytest.approx(0.44)
    assert result["basis"].startswith("host")


def test_cpu_ops_of_other_threads_do_not_count_twice():
    """On a CPU only the thread that runs the steps is broken down: a data-prefetch or gloo
    thread working at the same time is reported apart, so the shares still add to 100%
    (seen at 108.6% when the machine was loaded)."""
    events = [
        X("soda/step", 0, 1000, cat="user_annotation"),
        X("aten::mm", 0, 900),
        X("aten::copy_", 100, 800, tid=2),               # another thread, same wall time
        X("gloo:all_reduce", 200, 300, cat="user_annotation", tid=3),
    ]
    result = breakdown({"traceEvents": events})
    assert result["seconds"]["matmul"] == pytest.approx(900e-6)
    assert result["seconds"]["idle"] == pytest.approx(100e-6)
    assert sum(result["share"].values()) == pytest.approx(1.0)
    assert result["other_threads_seconds"] == pytest.approx(1100e-6)


def test_rules_on_a_gpu_trace_by_hand():
    """Kernel time by the CPU op that launched it; idle = no kernel running; overlap reported."""
    events = [
        X("soda/step", 0, 1000, cat="user_annotation"),
        X("aten::mm", 0, 50),
        X("cudaLaunchKernel", 10, 10, cat="cuda_runtime", correlation=1),
        X("soda/norm", 60, 40, cat="user_annotation"),
        X("aten::rms_norm", 60, 40),
        X("cuLaunchKernel", 70, 5, cat="cuda_driver", correlation=3),
        X("c10d::allreduce_", 80, 10, tid=2),
        X("cudaLaunchKernel", 82, 5, cat="cuda_runtime", tid=2, correlation=2),
        X("sm90_xmma_gemm_bf16", 100, 200, cat="kernel", tid=7, correlation=1),
        X("ncclDevKernel_AllReduce_Sum", 250, 150, cat="kernel", tid=8, correlation=2),
        X("triton_rmsnorm_kernel", 450, 50, cat="kernel", tid=7, correlation=3),
        X("unattributed_fmha_kernel", 600, 100, cat="kernel", tid=7, correlation=99),
    ]
    result = breakdown({"traceEvents": events})
    us = {k: round(v * 1e6, 6) for k, v in result["seconds"].items() if v}
    # busy union: [100, 400) + [450, 500) + [600, 700) = 450 us
    assert us == {"matmul": 200, "communication": 150, "norm": 50, "attention": 100, "idle": 550}
    assert result["overlap_seconds"] == pytest.approx(50e-6)
    assert result["basis"] == "device kernels"
    assert sum(result["share"].values()) == pytest.approx(1.05)


def test_name_rules():
    assert name_rule("nccl:all_reduce") == "communication"
    assert name_rule("aten::broadcast_tensors") is None
    assert name_rule("aten::addmm") == "matmul"
    assert name_rule("aten::add") is None
    assert name_rule("flash_attn::_flash_attn_backward") == "attention"
    assert name_rule("_VocabParallelCrossEntropy") == "loss"
    assert name_rule("aten::embedding_dense_backward") == "embedding"
    assert name_rule("Optimizer.step#AdamW.step") == "optimizer"


def test_trace_without_steps_is_refused():
    with pytest.raises(ValueError, match="soda/step"):
        breakdown({"traceEvents": [X("aten::mm", 0, 10)]})


def test_profile_command_on_tiny(tmp_path, capsys):
    from soda_mega.cli import main

    out = tmp_path / "trace.json"
    assert main(["profile", "--preset", "tiny", "--steps", "2", "--warmup", "1",
                 "--out", str(out), "--json"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{"):])
    trace = json.loads(out.read_text())
    steps = [e for e in trace["traceEvents"] if e.get("name") == "soda/step"]
    assert len(steps) == 2 and result["steps"] == 2
    assert set(result["share"]) == set(CATEGORIES)
    assert sum(result["share"].values()) == pytest.approx(1.0, abs=1e-9)
    for cat in ("matmul", "attention", "loss", "embedding", "norm", "optimizer"):
        assert result["seconds"][cat] > 0, cat
    # tiny's output layer (16,646 ids x 64) costs ~3x the FLOPs of its four layers' linears:
    # if the loss path's matmuls were counted as matmuls, this would flip.
    assert result["seconds"]["loss"] > result["seconds"]["matmul"]
    saved = json.loads((tmp_path / "trace.breakdown.json").read_text())
    assert saved["share"] == result["share"]
    assert main(["profile", "--analyze", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["seconds"] == pytest.approx(result["seconds"])
