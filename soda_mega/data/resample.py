"""Band-limited resampling with zero delay and exact output length, in plain torch.

The audio of a segment ``[start, end)`` seconds must stay at ``[start, end)`` after
resampling, or transcripts and codes drift apart. ``sphn.resample`` (rubato) shifts its
output by a few hundred samples (measured: 768 samples = 32 ms for 16 -> 24 kHz, 559 for
22.05 -> 24 kHz) and pads the tail, and torchaudio is not a dependency, so this module
implements the classic polyphase windowed-sinc resampler (as in torchaudio's ``sinc_interp_hann``):

With ``orig/new`` the rate ratio reduced by their gcd, output sample ``j`` of phase ``p = j mod
new`` is a dot product of the input around time ``j * orig / new`` with a Hann-windowed sinc
low-pass at ``rolloff * min(orig, new) / 2`` cycles per input sample, ``width`` zero crossings
wide. All ``new`` phase filters form one ``conv1d`` with stride ``orig``: cost
``O(S * (2 * width * orig / min(orig, new) + orig))`` and memory for ``new`` filters. Output
length is ``ceil(S * new / orig)``; output sample ``j`` sits at exactly input time
``j * orig / new``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

# Rational ratios whose reduced terms exceed this are approximated (see :func:`resample`).
MAX_PHASES = 1024


@lru_cache(maxsize=16)
def _kernel(orig: int, new: int, width: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Phase filters ``[new, 1, 2 * pad + orig]`` and the padding ``pad`` (input samples)."""
    cutoff = min(orig, new) * rolloff  # in units of the reduced rates
    pad = math.ceil(width * orig / cutoff)
    taps = torch.arange(-pad, pad + orig, dtype=torch.float64)[None, None] / orig
    phases = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new
    t = ((phases + taps) * cutoff).clamp(-width, width)
    window = torch.cos(t * math.pi / width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * window * cutoff / orig).float(), pad


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int, width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """Resample ``[..., S]`` float audio from ``orig_rate`` to ``new_rate`` Hz (see module doc).

    Rates whose reduced ratio needs more than :data:`MAX_PHASES` phases (e.g. 24001 -> 24000)
    are first rounded to the nearest ratio with at most that many, a pitch error below 0.1%.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate or wav.shape[-1] == 0:
        return wav
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    if max(orig, new) > MAX_PHASES:
        scale = MAX_PHASES / max(orig, new)
        orig, new = max(1, round(orig * scale)), max(1, round(new * scale))
        g = math.gcd(orig, new)
        orig, new = orig // g, new // g
    kernel, pad = _kernel(orig, new, width, rolloff)
    shape = wav.shape
    length = shape[-1]
    x = F.pad(wav.reshape(-1, 1, length).float(), (pad, pad + orig))
    y = F.conv1d(x, kernel.to(x.device), stride=orig)  # [B, new, frames]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    # NOTE: the length follows the true rates, also when the ratio was approximated above.
    out_len = math.ceil(new_rate * length / orig_rate)
    if y.shape[-1] < out_len:
        y = F.pad(y, (0, out_len - y.shape[-1]))
    return y[:, :out_len].reshape(*shape[:-1], out_len)
