"""Learning-rate schedules (SODA_SPEC section 3) and SODA's peak-learning-rate rule.

* Warmup-Stable-Decay (``wsd``): linear warmup over ``warmup_fraction`` of the steps from 0 to
  the peak, constant, then a decay over the last ``decay_fraction`` of the steps to ``min_lr``
  with shape ``linear``, ``cosine`` or ``1-sqrt`` (``1 - sqrt(progress)``, Hägele et al. 2024).
  SODA: 10% warmup, last 20% linear decay to 0.
* ``cosine``: the same warmup, then a half cosine from the peak to ``min_lr`` over all
  remaining steps.
* ``constant``: the same warmup, then the peak.

``lr_at(step)`` is the rate used for the update *of* step ``step`` (0-based), so the first
update uses ``peak / warmup_steps`` rather than 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from soda_mega.config.schema import TrainingConfig


def soda_peak_lr(global_batch_size: int, hidden_size: int) -> float:
    """SODA's rule: 0.003 * sqrt(B / 256) * sqrt(1024 / d), with d >= 1024.

    SODA_SPEC: "135M uses hidden=1024 in that formula", i.e. widths below 1024 are clamped to
    1024 (the 512-wide 135M model would otherwise get a sqrt(2) larger rate).
    """
    width = max(hidden_size, 1024)
    return 0.003 * math.sqrt(global_batch_size / 256) * math.sqrt(1024 / width)


@dataclass(frozen=True)
class LRSchedule:
    """A learning rate for each optimizer step of a run of ``total_steps`` steps."""

    peak: float
    total_steps: int
    kind: str = "wsd"
    warmup_fraction: float = 0.1
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"a schedule needs at least one step, got {self.total_steps}")
        if self.kind not in ("wsd", "cosine", "constant"):
            raise ValueError(f"training.lr_schedule: unknown schedule {self.kind!r}")
        if self.decay_shape not in ("linear", "cosine", "1-sqrt"):
            raise ValueError(f"training.decay_shape: unknown shape {self.decay_shape!r}")

    @classmethod
    def from_config(cls, t: TrainingConfig, total_steps: int, peak: float) -> LRSchedule:
        return cls(peak=peak, total_steps=total_steps, kind=t.lr_schedule,
                   warmup_fraction=t.warmup_fraction, decay_fraction=t.decay_fraction,
                   decay_shape=t.decay_shape, min_lr=t.min_lr)

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_fraction * self.total_steps))

    @property
    def decay_steps(self) -> int:
        return int(round(self.decay_fraction * self.total_steps))

    def _decay(self, progress: float) -> float:
        """Multiplier going from 1 (progress 0) to 0 (progress 1)."""
        progress = min(max(progress, 0.0), 1.0)
        if self.decay_shape == "linear":
            return 1.0 - progress
        if self.decay_shape == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - math.sqrt(progress)

    def lr_at(self, step: int) -> float:
        """Learning rate of the update at 0-based ``step``."""
        warmup = self.warmup_steps
        if step < warmup:
            return self.peak * (step + 1) / warmup
        if self.kind == "constant":
            return self.peak
        if self.kind == "cosine":
            span = max(self.total_steps - warmup, 1)
            progress = (step - warmup + 1) / span
            shape = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
            return self.min_lr + (self.peak - self.min_lr) * shape
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start or self.decay_steps == 0:
            return self.peak
        progress = (step - decay_start + 1) / self.decay_steps
        return self.min_lr + (self.peak - self.min_lr) * self._decay(progress)
