"""Waves of the production grids (compile_check's second table) and the lse grid's column
splits sized to whole waves (flce_ops.wave_splits). Grid arithmetic on meta tensors: no GPU,
no compile."""

from __future__ import annotations

import math

import torch

from soda_kernels import compile_check as cc
from soda_kernels.flce_ops import wave_splits


def _cost(row_tiles: int, col_tiles: int, slots: int, splits: int) -> int:
    """Wave-quantised time: waves (rounded up) x column tiles of the longest program."""
    return math.ceil(row_tiles * splits / slots) * math.ceil(col_tiles / splits)


def test_soda_shapes_are_the_presets_and_the_vocabulary():
    from soda_mega.config import load_config
    from soda_mega.tokens import VocabLayout

    hidden = {load_config(preset=p).model.hidden_size
              for p in ("soda-135m", "soda-600m", "soda-1.7b", "soda-4b")}
    layout = VocabLayout.soda_default()
    vocab = {layout.size, layout.padded_size(2, 128) // 2}
    assert {s.hidden for s in cc.SODA_SHAPES} == hidden
    assert {s.vocab for s in cc.SODA_SHAPES} == vocab
    assert cc.SCENARIO in cc.SODA_SHAPES


def test_lse_splits_never_cost_more_and_fix_the_issue_shape():
    """Against today's ~4 programs per SM (first), at every row count up to 32k and both
    vocabulary shards: the quantised time never grows, the splits at most double. At TP1,
    8192 rows (the issue's 576 programs = 4.36 waves on 132 SMs) it drops by > 5%."""
    for cols in (144_644, 72_448):
        col_tiles = math.ceil(cols / 128)
        for rows in range(128, 32_768 + 1, 128):
            row_tiles = math.ceil(rows / 128)
            first = max(1, min(math.ceil(4 * 132 / row_tiles), col_tiles))
            s = wave_splits(row_tiles, col_tiles, 132, first)
            assert first <= s <= 2 * first, (rows, cols, s)
            assert _cost(row_tiles, col_tiles, 132, s) <= _cost(row_tiles, col_tiles, 132, first)
    first = 9
    assert 64 * first / 132 == 576 / 132
    s = wave_splits(64, 1131, 132, first)
    assert _cost(64, 1131, 132, s) < 0.95 * _cost(64, 1131, 132, first), s


def test_lse_launch_uses_the_wave_sizing_and_waves_are_reported(monkeypatch):
    """The lse launch compile_check records (the production launcher on meta tensors) has the
    wave-sized grid, and ``waves`` divides programs by SMs x the record's CTAs per SM."""
    # NOTE: recording launches runs nothing; outside the interpreter the launchers take the
    # GPU's plan (autotuned grids), as in compile_check's own process.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lse = next(l for part, l in cc.production_launches(torch.bfloat16) if l.role == "lse")
    config = cc.configs_of(lse)[0]
    row_tiles = math.ceil(cc.SCENARIO.tokens / config["kwargs"]["BLOCK_N"])
    assert config["kwargs"]["BLOCK_N"] == 128
    splits = wave_splits(row_tiles, math.ceil(cc.SCENARIO.vocab / 128), 132, 9)
    assert cc.grid_programs(lse, config) == row_tiles * splits
    record = {"kernel": "lse_partials", "slice": "all", "dtype": "bf16", "ctas_per_sm": 1,
              "config": dict(config["kwargs"], num_warps=config["num_warps"],
                             num_stages=config["num_stages"])}
    items = cc.waves([record], shapes=[cc.SCENARIO])
    item = next(w for w in items if w["kernel"] == "lse_partials")
    assert item["programs"][0] == row_tiles * splits
    assert item["waves"][0] == round(row_tiles * splits / 132, 2)
    assert item["waves"][1] is None  # no record of that config: unknown, not guessed
    assert "| lse_partials | all |" in cc.waves_markdown(items)
