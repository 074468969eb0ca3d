"""bench_codec runs end to end in smoke mode on CPU and writes the rates `data plan` reads; the
projection refuses CPU rates for GPUs and does its arithmetic on given rates (not timed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from soda_mega.cli import main
from soda_mega.data.write.throughput import ThroughputError, load_rates, project

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_codec.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_codec", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_codec_smoke_writes_rates_and_plan_refuses_cpu_rates(tmp_path, capsys):
    payload = _bench().run(smoke=True, out_dir=tmp_path, device="cpu")
    path = tmp_path / "bench_codec_cpu_smoke.json"
    assert payload["path"] == str(path)
    result = json.loads(path.read_text())
    assert result["smoke"] is True and result["provenance"]["commit"]
    assert result["mimi"]["random_init"] is True
    assert [(r["batch_size"], r["chunk_seconds"]) for r in result["encode"]] == [(1, 0.8), (2, 0.8)]
    for row in result["encode"]:
        assert row["audio_s_per_s"] > 0 and row["frames"] == 10  # 0.8 s at 12.5 frames/s
    (cpu,) = result["cpu_side"]
    assert cpu["source_rate"] == 16000 and cpu["decode_resample_audio_s_per_s"] > 0
    rates = load_rates(path)
    assert rates["device"] == "cpu" and rates["codec_audio_s_per_s_per_device"] == max(
        r["audio_s_per_s"] for r in result["encode"])
    assert (tmp_path / "bench_codec_cpu_smoke.md").read_text().startswith("# bench_codec (smoke, cpu")
    assert main(["data", "plan", "--hours", "1000", "--gpus", "8", "--bench", str(path)]) == 2
    assert "measured on cpu, not on a GPU" in capsys.readouterr().err
    assert main(["data", "plan", "--hours", "1000", "--gpus", "8"]) == 2
    assert "needs measured rates" in capsys.readouterr().err


def test_projection_arithmetic_on_given_rates(tmp_path, capsys):
    # input numbers for the arithmetic, not measurements
    rates = {"device": "cuda", "codec_audio_s_per_s_per_device": 1000.0, "feeder_audio_s_per_s_per_process": 250.0,
             "node_audio_s_per_s": 1800.0, "node_gpus": 2, "num_codebooks": 8, "smoke": False,
             "best_setting": {"batch_size": 64, "chunk_seconds": 10.0}}
    p = project(rates, hours=1000, gpus=4)
    assert p["node_scaling"] == pytest.approx(0.9) and p["per_gpu_audio_s_per_s"] == pytest.approx(900)
    assert p["wall_hours"] == pytest.approx(1000 / (4 * 900)) and p["gpu_hours"] == pytest.approx(1000 / 900)
    assert p["feeders_needed_per_gpu"] == 4 and p["audio_tokens"] == pytest.approx(1000 * 3600 * 12.5 * 8)
    fed = project(rates, hours=1000, gpus=4, cpus_per_gpu=3)
    assert fed["per_gpu_audio_s_per_s"] == 500 and fed["limited_by"].startswith("feeders")
    with pytest.raises(ThroughputError, match="--gpus >= 1"):
        project(rates, hours=10, gpus=0)
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"rates": rates}))
    assert main(["data", "plan", "--hours", "1000", "--gpus", "4", "--bench", str(path)]) == 0
    out = capsys.readouterr().out
    assert "wall time    0.3 h" in out and "GPU-hours    1.1" in out and "4 decode/resample" in out
    assert main(["data", "plan", "--hours", "1", "--gpus", "1", "--bench", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
