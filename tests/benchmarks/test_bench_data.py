"""The data benchmark runs end to end in smoke mode and writes a stamped result (not timed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_data.py"


def test_bench_data_smoke_writes_stamped_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_data", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench_data.json"
    assert module.main(["--smoke", "--workers", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    assert result["provenance"]["device"]["kind"] in ("cpu", "cuda")
    assert result["provenance"]["commit"]
    assert result["loader"]["tokens"] == 10 * 2 * 256
    assert result["loader"]["tokens_per_s"] > 0
    fpt = result["yardstick"]["training_flops_per_token"]
    assert result["yardstick"]["consumed_tokens_per_s_per_gpu"] == 989e12 * 0.5 / fpt
