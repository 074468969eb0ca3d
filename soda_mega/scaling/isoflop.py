"""Chinchilla approach 2 (IsoFLOP profiles), as SODA_SPEC section 4 applies it.

For each budget ``C`` with runs ``(N_i, D_i, L_i)``, fit a parabola in ``x = ln N``::

    L(x) = c0 + c1 (x - m) + c2 (x - m)^2,     m = mean of x  (centring for conditioning)

by least squares; if ``c2 > 0`` its minimum is at ``x* = m - c1 / (2 c2)``, so
``N_opt(C) = exp(x*)`` and ``L_min(C) = c0 - c1^2 / (4 c2)``. The same with ``x = ln D`` gives
``D_opt(C)`` directly. Then the power laws ``N_opt = k C^a`` and ``D_opt = k' C^b`` are
straight lines fitted by least squares in ``(ln C, ln N_opt)`` and ``(ln C, ln D_opt)``. Under
``C = 6ND`` exactly ``a + b = 1``; with exact FLOP counting ``a + b`` may differ from 1.

Intervals come from a case bootstrap: each replicate redraws, within every budget, as many runs
as it has, with replacement (multinomial counts used as weights in the least squares), refits
every parabola and the power laws; an interval is the central ``ci`` quantile range of the
replicates. A replicate in which a parabola has fewer than 3 distinct sizes or is not convex is
discarded (the kept share is reported). With exactly 3 sizes in a budget its parabola
interpolates them and every usable replicate is the original data: no interval is given for
that budget (NaN), nor for the power laws, whose intervals would otherwise understate the
uncertainty. Intervals need 4 or more sizes in every budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from soda_mega.scaling.results import Results


class FitError(ValueError):
    """The data cannot give the fit asked for; the message says which budget and why."""


def weighted_quadratic(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``y = c0 + c1 x + c2 x^2`` for each row of weights ``w`` (..., n).

    Returns ``(coef (..., 3), usable (...))``; a row is usable when at least three distinct
    ``x`` have positive weight (otherwise its coefficients are NaN).
    """
    design = np.stack([np.ones_like(x), x, x * x], axis=-1)                  # (n, 3)
    normal = np.einsum("...n,ni,nj->...ij", w, design, design)
    rhs = np.einsum("...n,ni,n->...i", w, design, y)
    distinct = _distinct_positive(x, w)
    usable = distinct >= 3
    safe = np.where(usable[..., None, None], normal, np.eye(3))
    coef = np.linalg.solve(safe, rhs[..., None])[..., 0]
    return np.where(usable[..., None], coef, np.nan), usable


def _distinct_positive(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Number of distinct ``x`` values with positive weight, per row of ``w``."""
    _, inverse = np.unique(x, return_inverse=True)
    onehot = (inverse[:, None] == np.arange(inverse.max() + 1)[None, :]).astype(float)  # (n, groups)
    return ((w @ onehot) > 0).sum(axis=-1)


@dataclass(frozen=True)
class Parabola:
    """``L = c0 + c1 (x - m) + c2 (x - m)^2`` over ``x = ln N`` or ``x = ln D``."""

    variable: str
    center: float
    coef: tuple[float, float, float]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        u = np.asarray(x) - self.center
        return self.coef[0] + self.coef[1] * u + self.coef[2] * u * u

    @property
    def convex(self) -> bool:
        return self.coef[2] > 0

    @property
    def x_opt(self) -> float:
        return self.center - self.coef[1] / (2 * self.coef[2])

    @property
    def loss_opt(self) -> float:
        return self.coef[0] - self.coef[1] ** 2 / (4 * self.coef[2])


@dataclass(frozen=True)
class BudgetMinimum:
    """One IsoFLOP curve: its parabolas over ln N and ln D, the minima and their intervals."""

    budget: float
    n_points: int
    distinct_sizes: int
    over_n: Parabola
    over_d: Parabola
    n_opt: float
    n_opt_ci: tuple[float, float]
    d_opt: float
    d_opt_ci: tuple[float, float]
    loss_opt: float
    n_range: tuple[float, float]
    d_range: tuple[float, float]
    bootstrap_kept: float

    @property
    def n_inside(self) -> bool:
        """Whether the minimum over N lies inside the sizes that were trained."""
        return self.n_range[0] <= self.n_opt <= self.n_range[1]

    @property
    def d_inside(self) -> bool:
        return self.d_range[0] <= self.d_opt <= self.d_range[1]


@dataclass(frozen=True)
class PowerLaw:
    """``y = k * C^exponent`` with bootstrap intervals; ``samples`` are (ln k, exponent) pairs."""

    k: float
    exponent: float
    k_ci: tuple[float, float]
    exponent_ci: tuple[float, float]
    samples: np.ndarray

    def __call__(self, compute: float | np.ndarray) -> np.ndarray:
        return self.k * np.asarray(compute, dtype=float) ** self.exponent

    def interval(self, compute: float, ci: float = 0.95) -> tuple[float, float]:
        """Bootstrap interval of the prediction at ``compute``."""
        if len(self.samples) == 0:
            return np.nan, np.nan
        values = np.exp(self.samples[:, 0] + self.samples[:, 1] * np.log(compute))
        return _quantiles(values, ci)


@dataclass(frozen=True)
class IsoflopFit:
    """Approach 2 over all budgets."""

    minima: list[BudgetMinimum]
    n_law: PowerLaw
    d_law: PowerLaw
    ratio: float
    ratio_ci: tuple[float, float]
    n_boot: int
    bootstrap_kept: float
    ci: float

    def predict(self, compute: float) -> dict:
        """``N_opt`` and ``D_opt`` at ``compute`` with intervals."""
        return {"compute": compute, "n_opt": float(self.n_law(compute)),
                "n_opt_ci": self.n_law.interval(compute, self.ci),
                "d_opt": float(self.d_law(compute)), "d_opt_ci": self.d_law.interval(compute, self.ci)}


def _quantiles(values: np.ndarray, ci: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``y = c + s x`` along the last axis; returns (c, s)."""
    xm = x.mean()
    slope = ((x - xm) * (y - y.mean(axis=-1, keepdims=True))).sum(axis=-1) / ((x - xm) ** 2).sum()
    return y.mean(axis=-1) - slope * xm, slope


def fit_isoflop(results: Results, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> IsoflopFit:
    """Parabola minima per budget, power laws and intervals (method in the module docstring)."""
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    rng = np.random.default_rng(seed)
    budgets = results.budgets
    minima = []
    x_n_boot, x_d_boot, kept_all = [], [], np.ones(n_boot, dtype=bool)
    for budget in budgets:
        idx = results.of_budget(budget)
        ln_n, ln_d, loss = np.log(results.n_params[idx]), np.log(results.tokens[idx]), results.loss[idx]
        counts = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=n_boot).astype(float)
        fits = {}
        for name, x in (("N", ln_n), ("D", ln_d)):
            center = float(x.mean())
            coef, usable = weighted_quadratic(x - center, loss, np.ones(len(idx)))
            parabola = Parabola(name, center, tuple(float(c) for c in coef))
            if not usable:
                raise FitError(f"budget {budget:.3g}: fewer than 3 distinct values of {name}")
            if not parabola.convex:
                raise FitError(
                    f"budget {budget:.3g}: the loss is not convex in ln {name} (curvature "
                    f"{parabola.coef[2]:.3g}), so it has no minimum; the sizes do not bracket the "
                    "optimum or the losses are too noisy (add smaller and larger models)")
            boot, ok = weighted_quadratic(x - center, loss, counts)
            ok &= boot[:, 2] > 0
            with np.errstate(divide="ignore", invalid="ignore"):
                x_opt = center - boot[:, 1] / (2 * boot[:, 2])
            fits[name] = (parabola, x_opt, ok)
        (p_n, xn, ok_n), (p_d, xd, ok_d) = fits["N"], fits["D"]
        ok = ok_n & ok_d
        kept_all &= ok
        x_n_boot.append(xn)
        x_d_boot.append(xd)
        informative = ok.any() and len(np.unique(ln_n)) > 3
        n_ci = _quantiles(np.exp(xn[ok]), ci) if informative else (np.nan, np.nan)
        d_ci = _quantiles(np.exp(xd[ok]), ci) if informative else (np.nan, np.nan)
        minima.append(BudgetMinimum(
            budget=float(budget), n_points=len(idx), distinct_sizes=len(np.unique(ln_n)), over_n=p_n,
            over_d=p_d, n_opt=float(np.exp(p_n.x_opt)), n_opt_ci=n_ci, d_opt=float(np.exp(p_d.x_opt)),
            d_opt_ci=d_ci, loss_opt=p_n.loss_opt,
            n_range=(float(results.n_params[idx].min()), float(results.n_params[idx].max())),
            d_range=(float(results.tokens[idx].min()), float(results.tokens[idx].max())),
            bootstrap_kept=float(ok.mean())))
    kept_share = float(kept_all.mean())
    if any(m.distinct_sizes <= 3 for m in minima):
        kept_all[:] = False
    ln_c = np.log(budgets)
    laws = []
    for point, boot in (([m.over_n.x_opt for m in minima], x_n_boot),
                        ([m.over_d.x_opt for m in minima], x_d_boot)):
        c, s = _line(ln_c, np.asarray(point))
        samples = np.empty((0, 2))
        if kept_all.any():
            bc, bs = _line(ln_c, np.stack(boot, axis=-1)[kept_all])
            samples = np.stack([bc, bs], axis=-1)
        k_ci = _quantiles(np.exp(samples[:, 0]), ci) if len(samples) else (np.nan, np.nan)
        e_ci = _quantiles(samples[:, 1], ci) if len(samples) else (np.nan, np.nan)
        laws.append(PowerLaw(k=float(np.exp(c)), exponent=float(s), k_ci=k_ci, exponent_ci=e_ci,
                             samples=samples))
    n_law, d_law = laws
    if len(n_law.samples):
        ratio_ci = _quantiles(d_law.samples[:, 1] / n_law.samples[:, 1], ci)
    else:
        ratio_ci = (np.nan, np.nan)
    return IsoflopFit(minima=minima, n_law=n_law, d_law=d_law, ratio=d_law.exponent / n_law.exponent,
                      ratio_ci=ratio_ci, n_boot=n_boot, bootstrap_kept=kept_share, ci=ci)


def minimum_notes(fit: IsoflopFit) -> list[str]:
    """Warnings a reader of the fit should see (extrapolated minima, degenerate intervals)."""
    notes = []
    for m in fit.minima:
        label = f"budget {m.budget:.3g}"
        if not m.n_inside:
            notes.append(f"{label}: N_opt {m.n_opt:.3g} lies outside the trained sizes "
                         f"[{m.n_range[0]:.3g}, {m.n_range[1]:.3g}] (extrapolated minimum)")
        if not m.d_inside:
            notes.append(f"{label}: D_opt {m.d_opt:.3g} lies outside the trained token counts "
                         f"[{m.d_range[0]:.3g}, {m.d_range[1]:.3g}] (extrapolated minimum)")
        if m.distinct_sizes == 3:
            notes.append(f"{label}: 3 sizes, the parabola interpolates them: no bootstrap interval "
                         "(4+ sizes per budget give one)")
    if any(m.distinct_sizes == 3 for m in fit.minima):
        notes.append("no power-law intervals: they need 4+ sizes in every budget")
    elif fit.bootstrap_kept < 0.5:
        notes.append(f"only {fit.bootstrap_kept:.0%} of the bootstrap replicates gave convex parabolas "
                     "for every budget: the intervals rest on few replicates")
    return notes
