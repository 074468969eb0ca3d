"""The throughput benchmark in CPU smoke mode: runs end to end through the real training step
and writes a well-formed, stamped result with internally consistent numbers; `bench cost` on
that result says loudly that it is meaningless. Nothing here is timed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from soda_mega.config import load_config
from soda_mega.model.accounting import flops_per_token
from soda_mega.perf.throughput import SMOKE_CASES
from soda_mega.tokens import VocabLayout

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_throughput.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    spec = importlib.util.spec_from_file_location("bench_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--out-dir", str(out)]) == 0
    (path,) = out.glob("bench_throughput_*_smoke.json")
    return out, path, json.loads(path.read_text())


def test_smoke_result_is_stamped_and_complete(smoke):
    out, path, result = smoke
    prov = result["provenance"]
    assert path.name == f"bench_throughput_{prov['device']['kind']}_smoke.json"
    assert result["smoke"] is True and result["benchmark"] == "throughput"
    assert prov["commit"] and "torch" in prov["versions"] and "megatron-core" in prov["versions"]
    gemm = result["matmul_peak"]
    assert gemm["tflops"] > 0 and gemm["tflops_min"] <= gemm["tflops"] <= gemm["tflops_max"]
    if prov["device"]["kind"] == "cpu":
        assert gemm["dtype"] == "float32" and gemm["label"].startswith("CPU float32 GEMM")
        assert result["spec_peak_tflops"] is None
    rows = {(r["case"], r["variant"]): r for r in result["rows"]}
    assert {c for c, _ in rows} == set(SMOKE_CASES)
    for case in SMOKE_CASES:
        for variant in ("torch", "megatron"):
            assert rows[(case, variant)]["status"] == "ok", rows[(case, variant)]
        if prov["device"]["kind"] == "cpu":
            for variant in ("triton", "triton+flash"):
                r = rows[(case, variant)]
                assert r["status"] == "skipped" and "CUDA" in r["reason"]
            assert "flash-attn needs CUDA" in rows[(case, "triton+flash")]["reason"]
    assert not [r for r in result["rows"] if r["status"] == "error"]
    md = (out / path.name.replace(".json", ".md")).read_text()
    assert md.startswith("# bench_throughput (smoke, ")
    assert "CPU smoke run" in md and md.count("\n| ") == len(result["rows"]) + 1
    png = (out / path.name.replace(".json", ".png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_numbers_are_consistent(smoke):
    _, _, result = smoke
    gemm = result["matmul_peak"]["tflops"]
    for r in result["rows"]:
        if r["status"] != "ok":
            continue
        preset, overrides = SMOKE_CASES[r["case"]]
        cfg = load_config(preset=preset, overrides=overrides)
        vocab = VocabLayout.from_config(cfg.vocab).size
        s = r["settings"]
        assert s["global_batch_size"] == s["micro_batch_size"] * s["micro_batches_per_step"]
        assert r["tokens_per_step"] == s["global_batch_size"] * s["seq_length"]
        assert r["training_flops_per_token"] == flops_per_token(cfg.model, vocab).training
        assert r["training_flops_per_token_causal"] == flops_per_token(cfg.model, vocab, causal=True).training
        assert len(r["step_seconds"]) == r["timed_steps"] == 2 and r["warmup_steps"] == 1
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_step"] / r["step_seconds_median"])
        assert r["model_tflops_per_gpu"] == pytest.approx(
            r["training_flops_per_token"] * r["tokens_per_s_per_gpu"] / 1e12)
        assert r["mfu_vs_measured_gemm"] == pytest.approx(r["model_tflops_per_gpu"] / gemm)
        assert math.isfinite(r["final_loss"]) and r["skipped_updates"] == 0
        assert r["memory"]["predicted_allocated_gib"] > 0
    for comp in result["comparisons"]:
        assert comp["speedup_vs_megatron"]["megatron"] == 1.0
        assert comp["speedup_vs_megatron"]["torch"] > 0


def test_cost_from_smoke_results_says_it_is_meaningless(smoke, capsys):
    from soda_mega.cli import main
    from soda_mega.perf.cost import SMOKE_BANNER

    _, path, _ = smoke
    assert main(["bench", "cost", "--results", str(path), "--gpus", "64"]) == 0
    captured = capsys.readouterr()
    assert SMOKE_BANNER in captured.err
    assert captured.out.count(SMOKE_BANNER) == 2  # first and last line
    assert captured.out.startswith(SMOKE_BANNER) and captured.out.rstrip().endswith(SMOKE_BANNER)
    for preset in ("soda-135m", "soda-600m", "soda-1.7b", "soda-4b"):
        assert preset in captured.out
    assert "SODA reports ~1.3e+22 FLOPs" in captured.out
    assert main(["bench", "cost", "--results", str(path), "--gpus", "64", "--json"]) == 0
    proj = json.loads(capsys.readouterr().out)
    assert proj["meaningless_for_gpu_planning"] is True
