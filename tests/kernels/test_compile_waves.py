"""The lse grid's column splits sized by wave-quantised time where that costs nothing
(flce_ops.wave_splits), and the SODA shapes of compile_check's waves table. Arithmetic only;
the table itself is checked on the real compile in test_compile_check.py."""

from __future__ import annotations

import math

from soda_kernels import compile_check as cc
from soda_kernels.flce_ops import wave_splits
from soda_kernels.flce_tuning import CONFIGS


def _cost(rows: int, cols: int, splits: int, tile: tuple, per_sm: int, sms: int = 132) -> int:
    """Wave-quantised time: waves (rounded up) x column tiles of the longest program."""
    programs = math.ceil(rows / tile[0]) * splits
    return math.ceil(programs / (sms * per_sm)) * math.ceil(math.ceil(cols / tile[1]) / splits)


TILES = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"]) for c in CONFIGS["lse"]]
MODELS = [(tile, per_sm) for tile in TILES for per_sm in (1, 2)]


def _first(rows: int, cols: int) -> int:
    """Today's ~4 programs per SM (128-row tiles, 132 SMs)."""
    return max(1, min(math.ceil(4 * 132 / math.ceil(rows / 128)), math.ceil(cols / 128)))


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


def test_lse_splits_cost_nothing_and_help_where_they_can():
    """Against today's ~4 programs per SM, at every row count up to 32k and both vocabulary
    shards: no lse tile config's quantised time grows (at 1 or 2 programs per SM), the splits
    at most double; at TP1, 16384 rows some config gains > 10%."""
    for cols in (144_644, 72_448):
        for rows in range(128, 32_768 + 1, 128):
            first = _first(rows, cols)
            s = wave_splits(rows, cols, 132, first, TILES, math.ceil(cols / 128))
            assert first <= s <= 2 * first, (rows, cols, s)
            for tile, per_sm in MODELS:
                assert _cost(rows, cols, s, tile, per_sm) <= _cost(rows, cols, first, tile, per_sm)
    s = wave_splits(16384, 144_644, 132, 5, TILES, 1131)
    assert min(_cost(16384, 144_644, s, *m) / _cost(16384, 144_644, 5, *m) for m in MODELS) < 0.9


def test_the_issue_shape_has_no_free_whole_waves():
    """TP1, 8192 rows: 576 programs of 128 x 128 = 4.36 waves on 132 SMs. Every split count
    up to twice as many shortens that config but lengthens another (64 x 256 at one per SM),
    so the grid stays: the autotuner's choice on the GPU decides which tail remains."""
    assert _first(8192, 144_644) == 9 and 64 * 9 / 132 == 576 / 132
    for s in range(10, 19):
        ratios = [_cost(8192, 144_644, s, *m) / _cost(8192, 144_644, 9, *m) for m in MODELS]
        assert min(ratios) < 1 < max(ratios), (s, ratios)
    assert wave_splits(8192, 144_644, 132, 9, TILES, 1131) == 9
