"""The kernel benchmark runs end to end in smoke mode and writes a well-formed, stamped result
(not timed). A subprocess, because the benchmark must set TRITON_INTERPRET before importing
the kernels on a CPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


def test_bench_kernels_smoke_writes_stamped_json(tmp_path):
    # Two threads where there are two cores: the memory row's three forward + backward passes
    # at N=2048, H=512, V=144,644 are ~3 TFLOP of fp32 matmuls, most of this test's time, and
    # pytest waits idle meanwhile. The peaks it measures are the same with 1 or 2 threads.
    env = dict(os.environ, OMP_NUM_THREADS=str(min(2, os.cpu_count() or 1)), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.glob("bench_kernels_*_smoke.json")
    result = json.loads(path.read_text())
    device = result["provenance"]["device"]["kind"]
    assert path.name == f"bench_kernels_{device}_smoke.json"
    assert result["smoke"] is True
    assert result["provenance"]["device"]["kind"] == device and result["provenance"]["commit"]
    assert "torch" in result["provenance"]["versions"]
    timed = [r for r in result["rows"] if "fwd_bwd" in r]
    assert not [r for r in result["rows"] if "error" in r]
    for op, impls in (("loss", {"reference", "torch_eager", "megatron", "soda_torch", "soda_triton",
                                "soda_torch_train", "soda_triton_train",
                                "soda_triton_train_torchgemm", "soda_triton_train_recompute",
                                "soda_triton_train_recompute_torchgemm",
                                "soda_triton_train_measured"}),
                      ("embedding", {"reference", "torch", "megatron", "soda_triton"})):
        assert impls <= {r["impl"] for r in timed if r["op"] == op}
    # Issue 34: at every shape the measured choice timed both designs x both GEMM engines.
    chosen = [r for r in timed if r["impl"] == "soda_triton_train_measured"]
    assert len(chosen) == 2 and all(len(r["candidates_s"]) == 4 for r in chosen)
    assert "Measured loss plan" in (tmp_path / f"bench_kernels_{device}_smoke.md").read_text()
    for r in timed:
        assert r["fwd"] > 0 and r["bwd"] > 0 and r["fwd_bwd"] >= r["fwd"]
        if r["op"] == "loss" and r["impl"] != "reference":
            assert r["loss_rel_diff_vs_reference"] < 1e-5, r
        if r["impl"] == "soda_triton":
            assert r["speedup_of_triton"]["fwd_bwd"] == 1.0
    md = (tmp_path / f"bench_kernels_{device}_smoke.md").read_text()
    assert md.startswith("# bench_kernels")
    # Accounting: the fused design's FLOPs are 8 N H V (4/3 of the 6 N H V ideal) at SODA shapes.
    costs = [r for r in result["rows"] if r["op"] == "loss_cost"]
    assert {(r["tokens"], r["hidden"], r["tp"]) for r in costs} >= {(16384, 2048, 1), (8192, 512, 4)}
    for r in costs:
        assert r["flops"] == 8 * r["tokens"] * r["hidden"] * r["vocab_local"]
        assert r["flops_over_ideal"] == 8 / 6 and r["bytes"] > r["ideal_bytes"] > 0
    # The training path (issue 22): exactly the 6 N H V ideal.
    trains = [r for r in result["rows"] if r["op"] == "loss_cost_train"]
    assert {(r["tokens"], r["hidden"], r["tp"]) for r in trains} == {
        (r["tokens"], r["hidden"], r["tp"]) for r in costs}
    for r in trains:
        assert r["flops"] == r["ideal_flops"] == 6 * r["tokens"] * r["hidden"] * r["vocab_local"]
        assert r["flops_over_ideal"] == 1.0 and r["bytes"] > r["ideal_bytes"] > 0
    assert "x ideal FLOPs" in md and "| 1.00 |" in md
    # Peak memory at N=2048, H=512, V=144,644 fp32 (issue 13): fused <= 1.2x the logits-free
    # minimum, materialised logits far above it; the training path too (issue 22).
    (mem,) = [r for r in result["rows"] if r["op"] == "loss_memory"]
    assert (mem["tokens"], mem["hidden"], mem["vocab_local"]) == (2048, 512, 144_644)
    minimum = mem["logits_free_minimum_bytes"]
    assert minimum >= 2 * 144_644 * 512 * 4  # W and grad_W at least
    assert mem["peak_bytes"]["fused"] >= 2 * 144_644 * 512 * 4
    assert mem["fused_over_minimum"] <= 1.2 and mem["fused_target_met"]
    assert mem["materialised_over_fused"] > 3
    assert mem["fused_train_over_minimum"] <= 1.2 and mem["fused_train_target_met"]
    assert "logits-free minimum" in md


def test_bench_kernels_cpu_measure(tmp_path):
    """Without a GPU and without --smoke: the CPU measure (issue 22), here at a small shape:
    fp32 timings of materialised logits, Megatron, the recompute and the training path, each
    loss equal to the materialised one, the cost model's x ideal FLOPs of both designs; the
    GEMM-engine table (issue 34): both designs x both engines side by side in the interpreter,
    and the measured choice among them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(BENCH), "--cpu-shape", "256", "64", "3000",
                           "--engine-shape", "16", "16", "64", "--skip-memory", "--iters", "1", "--warmup", "0",
                           "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench_kernels_cpu.json").read_text())
    timed = {r["impl"]: r for r in result["rows"] if r["op"] == "loss_cpu"}
    assert set(timed) == {"materialised", "megatron", "soda_torch", "soda_torch_train"}
    for r in timed.values():
        assert (r["tokens"], r["hidden"], r["vocab_local"]) == (256, 64, 3000)
        assert r["fwd_bwd"] > 0 and r["speedup_over_materialised"] > 0
        assert r["loss_rel_diff_vs_materialised"] < 1e-5, r
    assert timed["materialised"]["speedup_over_materialised"] == 1.0
    ratios = {r["op"]: r["flops_over_ideal"] for r in result["rows"] if "flops_over_ideal" in r}
    assert ratios == {"loss_cost": 8 / 6, "loss_cost_train": 1.0}
    engines = {r["impl"]: r for r in result["rows"] if r["op"] == "loss_engine_cpu"}
    assert {(r["loss_plan"], r["gemm_engine"]) for r in engines.values()} == {
        ("three_matmul", "triton"), ("three_matmul", "torch"), ("recompute", "triton"),
        ("recompute", "torch"), ("measure", "auto")}
    for r in engines.values():
        assert (r["tokens"], r["hidden"], r["vocab_local"]) == (16, 16, 64) and r["fwd_bwd"] > 0
        assert r["loss_rel_diff_vs_reference"] < 1e-5, r
    chosen = engines["soda_triton_train_measured"]
    assert chosen["choice"] in {f"{d}/{e}" for d in ("recompute", "three_matmul")
                                for e in ("triton", "torch")}
    assert len(chosen["candidates_s"]) == 4 and "static choice three_matmul" in chosen["prior"]
    md = (tmp_path / "bench_kernels_cpu.md").read_text()
    assert "speedup over materialised" in md and "x ideal FLOPs" in md
    assert "both GEMM engines" in md and chosen["choice_line"] in md
