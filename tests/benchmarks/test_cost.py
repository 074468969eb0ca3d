"""Cost projection arithmetic: GPU-hours and days from a measured rate, projection of the other
presets at the same TFLOP/s, FLOPs in both attention conventions next to SODA's 1.3e22."""

from __future__ import annotations

import json

import pytest

from soda_mega.perf.cost import SMOKE_BANNER, format_projection, preset_flops, project, read_results


def test_measured_rate_to_gpu_hours_and_days():
    proj = project(64, tokens=500e9, tokens_per_s=10_000.0, for_preset="soda-1.7b")
    rows = {r["preset"]: r for r in proj["rows"]}
    r = rows["soda-1.7b"]
    assert r["basis"].startswith("measured")
    assert r["gpu_hours"] == pytest.approx(500e9 / 10_000 / 3600)        # 13,888.9 GPU-hours
    assert r["days"] == pytest.approx(500e9 / 10_000 / 3600 / 64 / 24)   # 9.04 days on 64 GPUs
    f17, f4 = preset_flops("soda-1.7b", 1.0), preset_flops("soda-4b", 1.0)
    assert r["model_tflops_per_gpu"] == pytest.approx(10_000 * f17["per_token_full"] / 1e12)
    # Other presets: same model FLOP/s per GPU, so tokens/s scales with 1 / FLOPs per token.
    assert rows["soda-4b"]["basis"].startswith("projected")
    assert rows["soda-4b"]["tokens_per_s_per_gpu"] == pytest.approx(
        10_000 * f17["per_token_full"] / f4["per_token_full"])
    assert not proj["meaningless_for_gpu_planning"]


def test_soda_4b_flops_in_both_conventions():
    proj = project(8, tflops_per_gpu=100.0)
    four = proj["soda_4b"]
    f = preset_flops("soda-4b", 500e9)
    assert four["exact_full"] == f["full"] and four["exact_causal"] == f["causal"]
    # causal attention halves the score/value FLOPs only: between 6ND and the full count
    assert four["six_nd"] < four["exact_causal"] < four["exact_full"]
    assert four["reported_flops"] == 1.3e22
    # the exact count lands within 25% of SODA's reported figure (SODA_SPEC section 3)
    assert 0.75 < four["exact_causal"] / 1.3e22 < 1.25
    text = format_projection(proj)
    assert "SODA reports ~1.3e+22" in text and SMOKE_BANNER not in text


def _fake_result(tmp_path, kind, smoke):
    row = {"case": "soda-135m", "variant": "triton", "status": "ok", "tokens_per_s_per_gpu": 1000.0,
           "model_tflops_per_gpu": 1.0, "training_flops_per_token": 1e9}
    slower = dict(row, variant="megatron", tokens_per_s_per_gpu=500.0)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmark": "throughput", "smoke": smoke, "rows": [slower, row],
                                "provenance": {"device": {"kind": kind, "name": "x"}, "commit": "c"}}))
    return path


def test_results_file_picks_fastest_variant_and_flags_cpu(tmp_path):
    gpu = read_results(_fake_result(tmp_path, "cuda", False))
    assert not gpu["smoke"] and gpu["rows"]["soda-135m"]["variant"] == "triton"
    proj = project(64, results=gpu)
    assert proj["rows"][0]["basis"] == "measured: soda-135m (triton)"
    assert not proj["meaningless_for_gpu_planning"]
    assert read_results(_fake_result(tmp_path, "cpu", False))["smoke"]      # CPU, even if not --smoke
    assert read_results(_fake_result(tmp_path, "cuda", True))["smoke"]      # a smoke run on a GPU


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="give --results"):
        project(64)
    with pytest.raises(ValueError, match="--for-preset"):
        project(64, tokens_per_s=1.0, for_preset="soda-9b")
    with pytest.raises(ValueError, match="--gpus"):
        project(0, tflops_per_gpu=1.0)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a bench_throughput result"):
        read_results(bad)
