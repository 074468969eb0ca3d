"""``soda-mega plan``: the ranked table, --json, --explain, the override line that selects the
best layout (checked by loading it), the errors users see, the dry-run's rank line, and the
calibration loader on a synthetic campaign result (it must never invent a number)."""

from __future__ import annotations

import json

import pytest

from soda_mega.cli import main
from soda_mega.config import load_config
from soda_mega.planning import calibrate
from soda_mega.planning.hardware import gpu_spec
from soda_mega.planning.search import rank_layouts, rank_line
from soda_mega.planning.steptime import _soda_loss_seconds


def test_plan_json_ranks_fitting_layouts_and_the_override_line_selects_the_best(capsys):
    assert main(["plan", "--preset", "soda-600m", "--gpus", "16", "--tokens", "1e11", "--json",
                 "--no-calibration"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert len(rows) > 5 and out["measured"] == {}
    times = [r["step_s"] for r in rows]
    assert times == sorted(times)
    assert all(r["memory_gib"] <= 80 and r["tp"] * r["pp"] * r["dp"] == 16 for r in rows)
    best = rows[0]
    assert best["days"] == pytest.approx(1e11 / best["tokens_per_s_per_gpu"] / 16 / 86400)
    # the printed overrides select exactly that layout
    cfg = load_config(None, "soda-600m", best["overrides"].split())
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.training.micro_batch_size,
            cfg.training.recompute) == (best["tp"], best["pp"], best["micro_batch"], best["recompute"])


def test_plan_table_and_explain(capsys):
    assert main(["plan", "--preset", "soda-135m", "--gpus", "8", "--top", "3", "--explain",
                 "--gpu", "h200", "--no-calibration"]) == 0
    out = capsys.readouterr().out
    assert "H200" in out and "best: --parallel.tensor_parallel=" in out
    assert "pipeline bubble" not in out.split("# constants")[0] or "PP1" not in out
    assert "layer gemm_bwd" in out and "gemm_half_dim" in out and "all assumed" in out


def test_plan_errors_are_one_line_exit_2(capsys):
    assert main(["plan", "--preset", "soda-135m", "--gpu", "b300"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "b300" in err and "h100-sxm" in err
    # soda-4b's weights and optimizer state alone do not fit one 80 GB GPU
    assert main(["plan", "--preset", "soda-4b", "--gpus", "1"]) == 2
    assert "no layout" in capsys.readouterr().err


def test_more_memory_admits_more_layouts():
    cfg = load_config(None, "soda-4b", [])
    h100, h200 = rank_layouts(cfg, 8, gpu_spec("h100")), rank_layouts(cfg, 8, gpu_spec("h200"))
    assert len(h200) > len(h100) > 0
    assert max(c.memory_gib for c in h200) > 80


def test_rank_line_places_a_layout_that_does_not_fit():
    # soda-4b with no recompute and micro-batch 8 on TP1 does not fit an H100
    cfg = load_config(None, "soda-4b", ["--training.micro_batch_size=8"])
    line = rank_line(cfg, 64)
    assert "does not fit 80 GiB" in line and "best" in line and "--parallel.tensor_parallel=" in line
    assert "ranks 1 of" in rank_line(load_config(None, "soda-4b", ranked_best_overrides(cfg)), 64)


def ranked_best_overrides(cfg) -> list[str]:
    return rank_layouts(cfg, 64, gpu_spec("h100"))[0].overrides().split()


def _campaign(device: str, smoke: bool = False, peak: float | None = 700.0) -> dict:
    """A converted campaign result shaped like campaign_report.convert's (synthetic numbers)."""
    gpu = gpu_spec("h100-sxm")
    n, h, v = 2048, 1024, 144644
    loss = _soda_loss_seconds(n, h, v, gpu)[0]
    emb = n * h * 14 / (gpu.hbm_bytes_per_s * gpu.hbm_efficiency)
    phases = {"env": {"matmul_peak": {"tflops": peak}} if peak else {},
              "kernels_triton": {"rows": [
                  {"op": "loss", "impl": "soda_triton_train", "tokens": n, "hidden": h,
                   "vocab_local": v, "fwd_bwd": 1.5 * loss},
                  {"op": "loss", "impl": "torch_eager", "tokens": n, "hidden": h, "vocab_local": v,
                   "fwd_bwd": 9.0},
                  {"op": "embedding", "impl": "soda_triton", "tokens": n, "hidden": h,
                   "vocab_local": v, "fwd_bwd": 2.0 * emb}]}}
    return {"benchmark": "gpu_campaign", "smoke": smoke,
            "provenance": {"device": {"kind": "cuda", "name": device}},
            "campaign": {"started_utc": "2026-12-01T10:00:00+00:00"}, "phases": phases}


def test_calibration_fits_measured_constants_and_invents_none(tmp_path):
    h100 = gpu_spec("h100-sxm")
    h100_file = tmp_path / "gpu_h100-80gb-hbm3_2026-12-01.json"
    h100_file.write_text(json.dumps(_campaign("NVIDIA H100 80GB HBM3")))
    (tmp_path / "gpu_h200_2026-12-01.json").write_text(json.dumps(_campaign("NVIDIA H200", peak=None)))
    (tmp_path / "gpu_smoke.json").write_text(json.dumps(_campaign("NVIDIA H100 80GB HBM3", smoke=True)))
    path = calibrate.newest_for(h100, tmp_path)
    assert path.name.startswith("gpu_h100")
    cal = calibrate.fit(json.loads(path.read_text()), h100, path.name)
    assert cal.gpu.gemm_large == pytest.approx(700 / 989)
    assert cal.eff.fused_loss_scale == pytest.approx(1.5) and cal.eff.embedding_scale == pytest.approx(2.0)
    assert set(cal.measured) == {"gemm_large", "fused_loss_scale", "embedding_scale"}
    assert cal.assumed == ["fa2_attention_fwd", "fa2_attention_bwd"]
    # the H200 file has no matmul peak: gemm_large stays assumed, nothing is made up
    h200 = gpu_spec("h200")
    cal = calibrate.fit(json.loads((tmp_path / "gpu_h200_2026-12-01.json").read_text()), h200, "x")
    assert "gemm_large" not in cal.measured and cal.gpu.gemm_large == h200.gemm_large
    # no result for the A100, and a smoke file alone is never used
    assert calibrate.newest_for(gpu_spec("a100"), tmp_path) is None
    h100_file.unlink()
    assert calibrate.newest_for(h100, tmp_path) is None
