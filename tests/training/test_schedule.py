"""Learning-rate schedules and the SODA peak-LR rule against hand computations."""

from __future__ import annotations

import math

import pytest

from soda_mega.training.schedule import LRSchedule, soda_peak_lr


def test_soda_peak_lr_rule():
    # SODA_SPEC 3: 0.003 * sqrt(B/256) * sqrt(1024/d); 135M (d=512) uses d=1024.
    assert soda_peak_lr(512, 512) == pytest.approx(0.003 * math.sqrt(2))
    assert soda_peak_lr(512, 1024) == pytest.approx(0.003 * math.sqrt(2))
    assert soda_peak_lr(512, 2048) == pytest.approx(0.003 * math.sqrt(2) * math.sqrt(0.5))
    assert soda_peak_lr(256, 2560) == pytest.approx(0.003 * math.sqrt(1024 / 2560))


def test_wsd_linear_matches_hand_values():
    s = LRSchedule(peak=1.0, total_steps=100, kind="wsd", warmup_fraction=0.1, decay_fraction=0.2)
    assert s.warmup_steps == 10 and s.decay_steps == 20
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(9) == pytest.approx(1.0)
    assert all(s.lr_at(k) == 1.0 for k in range(10, 80))
    assert s.lr_at(80) == pytest.approx(1 - 1 / 20)
    assert s.lr_at(89) == pytest.approx(0.5)
    assert s.lr_at(99) == pytest.approx(0.0)


@pytest.mark.parametrize("shape,expected_mid", [
    ("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_decay_shapes(shape, expected_mid):
    s = LRSchedule(peak=2.0, total_steps=40, kind="wsd", warmup_fraction=0.0, decay_fraction=0.5,
                   decay_shape=shape, min_lr=0.0)
    # Decay covers steps 20..39; step 29 is progress 10/20 = 0.5.
    assert s.lr_at(29) == pytest.approx(2.0 * expected_mid)
    assert s.lr_at(39) == pytest.approx(0.0, abs=1e-12)
    values = [s.lr_at(k) for k in range(20, 40)]
    assert values == sorted(values, reverse=True)


def test_min_lr_and_cosine_and_constant():
    s = LRSchedule(peak=1.0, total_steps=10, kind="wsd", warmup_fraction=0.0, decay_fraction=0.5,
                   min_lr=0.1)
    assert s.lr_at(9) == pytest.approx(0.1)
    c = LRSchedule(peak=1.0, total_steps=21, kind="cosine", warmup_fraction=0.0, min_lr=0.0)
    assert c.lr_at(0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 21)))
    assert c.lr_at(20) == pytest.approx(0.0, abs=1e-12)
    k = LRSchedule(peak=3.0, total_steps=10, kind="constant", warmup_fraction=0.2)
    assert [k.lr_at(i) for i in range(4)] == pytest.approx([1.5, 3.0, 3.0, 3.0])


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="at least one step"):
        LRSchedule(peak=1.0, total_steps=0)
    with pytest.raises(ValueError, match="decay_shape"):
        LRSchedule(peak=1.0, total_steps=5, decay_shape="exp")
