"""From a FLOP budget to a number of training tokens, with exact or naive (6N) counting.

The exact count is :func:`soda_mega.model.accounting.flops_per_token` with the *full-attention*
convention (Chinchilla's, and SODA_SPEC section 4's "attention scores and values at the sequence
length"): per token and layer the two attention matmuls cost ``2 * s * H * d`` forward FLOPs
each, not halved for the causal mask; the LM head uses the real (unpadded) vocabulary ``V``;
training = 3 x forward. So a run of ``D`` tokens costs::

    C_exact(D) = f_exact * D,      f_exact = flops_per_token(model, V).training
    C_6N(D)    = 6 * N * D,        N = non-embedding + output layer (SODA size label, unpadded)

For a budget ``C`` the token target is ``D* = C / f`` with ``f`` the per-token cost of the
chosen counting mode. Training proceeds in whole optimizer steps of ``B * s`` tokens, so the
run gets ``steps = round(D* / (B * s))`` steps and ``D = steps * B * s`` tokens; its counted
FLOPs miss the budget by at most ``B * s / (2 D*)`` relative (:attr:`TokenPlan.budget_error`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from soda_mega.config.schema import ModelConfig
from soda_mega.model.accounting import count_parameters, flops_per_token
from soda_mega.tokens.layout import VocabLayout

#: FLOP counting modes: ``exact`` (full-attention matmul count, SODA) and ``6nd`` (6 * N * D).
FLOPS_MODES = ("exact", "6nd")


def per_token_costs(model: ModelConfig, layout: VocabLayout) -> tuple[float, float]:
    """``(f_exact, 6N)``: training FLOPs per token, exact (full attention) and naive."""
    fpt = flops_per_token(model, layout.size, causal=False)
    return fpt.training, fpt.six_n


def size_label(model: ModelConfig, layout: VocabLayout) -> int:
    """SODA's N: non-embedding parameters + the untied output layer, unpadded vocabulary."""
    return count_parameters(model, layout).size_label_unpadded


def run_compute(model: ModelConfig, layout: VocabLayout, tokens: float, mode: str = "exact") -> float:
    """Training FLOPs of ``tokens`` tokens on ``model`` in counting ``mode``."""
    exact, six_n = per_token_costs(model, layout)
    return _pick(mode, exact, six_n) * tokens


def _pick(mode: str, exact: float, six_n: float) -> float:
    if mode not in FLOPS_MODES:
        raise ValueError(f"flops mode {mode!r} is unknown; choose one of {', '.join(FLOPS_MODES)}")
    return exact if mode == "exact" else six_n


@dataclass(frozen=True)
class TokenPlan:
    """Tokens, steps and FLOPs of one run placed on a budget (math in the module docstring)."""

    budget: float
    mode: str
    flops_per_token_exact: float
    flops_per_token_6n: float
    tokens_target: float
    batch_size: int
    seq_length: int
    steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_length

    @property
    def tokens(self) -> int:
        """Tokens the run actually trains on: whole steps of ``B * s``."""
        return self.steps * self.tokens_per_step

    @property
    def flops_exact(self) -> float:
        return self.flops_per_token_exact * self.tokens

    @property
    def flops_6n(self) -> float:
        return self.flops_per_token_6n * self.tokens

    @property
    def counted_flops(self) -> float:
        """FLOPs of the run in the counting mode the budget was set in."""
        return self.flops_exact if self.mode == "exact" else self.flops_6n

    @property
    def budget_error(self) -> float:
        """``counted_flops / budget - 1`` (from rounding to whole steps)."""
        return self.counted_flops / self.budget - 1.0

    @property
    def exact_over_6n(self) -> float:
        """How much the exact count exceeds 6N for this model (``f_exact / 6N``)."""
        return self.flops_per_token_exact / self.flops_per_token_6n

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(tokens=self.tokens, flops_exact=self.flops_exact, flops_6n=self.flops_6n,
                   budget_error=self.budget_error, exact_over_6n=self.exact_over_6n)
        return out


def tokens_for_budget(model: ModelConfig, layout: VocabLayout, budget: float, mode: str = "exact") -> float:
    """``D* = C / f``: the (fractional) token count that spends ``budget`` FLOPs exactly."""
    if not budget > 0:
        raise ValueError(f"a FLOP budget must be > 0, got {budget!r}")
    exact, six_n = per_token_costs(model, layout)
    return budget / _pick(mode, exact, six_n)


def plan_tokens(model: ModelConfig, layout: VocabLayout, budget: float, batch_size: int,
                mode: str = "exact") -> TokenPlan:
    """Whole optimizer steps of ``batch_size`` sequences closest to spending ``budget``.

    ``model.seq_length`` is the sequence length ``s``; at least one step is planned.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    exact, six_n = per_token_costs(model, layout)
    target = tokens_for_budget(model, layout, budget, mode)
    steps = max(1, round(target / (batch_size * model.seq_length)))
    return TokenPlan(budget=float(budget), mode=mode, flops_per_token_exact=exact,
                     flops_per_token_6n=six_n, tokens_target=target, batch_size=batch_size,
                     seq_length=model.seq_length, steps=steps)
