"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus), with a mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How the next id is picked. ``temperature=0`` is greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no nucleus cut

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling(temperature=0.0)


def filter_logits(logits: torch.Tensor, sampling: Sampling,
                  allowed: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits ``[B, V]`` with every excluded id at -inf (mask, then top-k, then top-p)."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if sampling.greedy:
        return logits
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop an id when the ids ranked above it already hold top_p of the mass; the first
        # id always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose(logits: torch.Tensor, sampling: Sampling, allowed: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next id of each row (``[B]``), never one outside ``allowed``."""
    filtered = filter_logits(logits, sampling, allowed)
    if sampling.greedy:
        return filtered.argmax(-1)
    probs = torch.softmax(filtered, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)
