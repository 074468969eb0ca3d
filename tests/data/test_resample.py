"""The zero-delay windowed-sinc resampler: exact length, timing and band-limited accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from soda_mega.data.resample import resample


@pytest.mark.parametrize("src", [8000, 16000, 22050, 44100, 48000, 24001])
def test_length_and_zero_delay(src):
    x = torch.zeros(2 * src)
    x[src // 2] = 1.0  # an impulse at 0.5 s stays at 0.5 s
    y = resample(x, src, 24000)
    assert y.shape == (math.ceil(2 * src * 24000 / src),)
    assert int(y.abs().argmax()) == 12000


@pytest.mark.parametrize("src,freq", [(16000, 440.0), (22050, 1000.0), (48000, 3000.0)])
def test_sine_in_band_is_preserved(src, freq):
    x = torch.sin(2 * math.pi * freq * torch.arange(3 * src) / src)
    y = resample(x, src, 24000)
    ref = torch.sin(2 * math.pi * freq * torch.arange(len(y)) / 24000)
    assert (y - ref)[2000:-2000].abs().max() < 5e-3


def test_shapes_and_identity():
    x = torch.randn(2, 3, 1600)
    assert resample(x, 16000, 24000).shape == (2, 3, 2400)
    assert resample(x, 16000, 16000) is x
    assert resample(torch.zeros(0), 16000, 24000).shape == (0,)
    with pytest.raises(ValueError):
        resample(x, 0, 24000)
