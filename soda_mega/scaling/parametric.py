"""Chinchilla approach 3: fit ``L(N, D) = E + A / N^alpha + B / D^beta`` to every run at once.

Following Hoffmann et al. (2022, appendix D.2), with ``a = ln A``, ``b = ln B``, ``e = ln E``
the model of the log-loss is ``LSE(a - alpha ln N, b - beta ln D, e)`` and the parameters
minimise the Huber loss (``delta = 1e-3``) of its residuals against ``ln L``::

    min  sum_i  w_i * Huber_delta( LSE(a - alpha ln N_i, b - beta ln D_i, e) - ln L_i )

from every start of a grid (alpha, beta in {0, 0.5, ..., 2}; e in {-1, -0.5, ..., 1};
a, b in {0, 5, ..., 25}: 4,500 starts); the best end point wins. Hoffmann et al. used L-BFGS;
here (numpy only) each start runs Levenberg-Marquardt on the iteratively reweighted least
squares form of the Huber loss (weights ``min(1, delta / |r|)``, exact gradient, Gauss-Newton
curvature), all starts at once as one batch. The report says how many starts reached the best
objective, a check that the optimum is not a lucky local one.

Intervals: a case bootstrap (multinomial run counts as the weights ``w_i``), each replicate
refitted from the best parameters.

Compute-optimal allocation under ``C = 6 N D`` is closed-form::

    N_opt = G (C/6)^a_opt,  D_opt = G^-1 (C/6)^b_opt,  G = (alpha A / (beta B))^(1/(alpha+beta)),
    a_opt = beta / (alpha + beta),  b_opt = alpha / (alpha + beta)

For another per-token cost ``f(N)`` (the exact FLOP count of a family of shapes) the optimum
``min_N L(N, C / f(N))`` is found numerically (:func:`compute_optimal`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Hoffmann et al.'s grid of initialisations.
INIT_ALPHA = INIT_BETA = np.arange(0.0, 2.01, 0.5)
INIT_E = np.arange(-1.0, 1.01, 0.5)
INIT_A = INIT_B = np.arange(0.0, 25.1, 5.0)
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


@dataclass(frozen=True)
class LawParams:
    """``L(N, D) = E + A / N^alpha + B / D^beta``."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(d, float) ** self.beta

    @property
    def a_opt(self) -> float:
        """Exponent of ``N_opt ~ C^a`` under ``C = 6ND``: ``beta / (alpha + beta)``."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b_opt(self) -> float:
        """Exponent of ``D_opt ~ C^b`` under ``C = 6ND``: ``alpha / (alpha + beta)``."""
        return self.alpha / (self.alpha + self.beta)

    def optimal_6nd(self, compute: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Closed-form ``(N_opt, D_opt)`` at ``compute = 6 N D``."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        c6 = np.asarray(compute, float) / 6
        return g * c6 ** self.a_opt, c6 ** self.b_opt / g

    def to_dict(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
                "a_opt_6nd": self.a_opt, "b_opt_6nd": self.b_opt}


@dataclass(frozen=True)
class ParametricFit:
    """Best parameters, how robustly they were found, and bootstrap samples."""

    params: LawParams
    objective: float
    delta: float
    n_inits: int
    n_at_best: int
    samples: np.ndarray     # (replicates, 5): E, A, B, alpha, beta
    ci: float

    def interval(self, name: str) -> tuple[float, float]:
        """Bootstrap interval of ``E``, ``A``, ``B``, ``alpha``, ``beta``, ``a_opt`` or ``b_opt``."""
        if len(self.samples) == 0:
            return np.nan, np.nan
        cols = {n: self.samples[:, i] for i, n in enumerate(PARAM_NAMES)}
        with np.errstate(invalid="ignore", divide="ignore"):
            cols["a_opt"] = cols["beta"] / (cols["alpha"] + cols["beta"])
            cols["b_opt"] = cols["alpha"] / (cols["alpha"] + cols["beta"])
        # NOTE: an ill-determined fit can send A or B to overflow in some replicates; +inf sorts
        # last, so the quantiles stay meaningful (an infinite upper end says so).
        values = np.where(np.isnan(cols[name]), np.inf, cols[name])
        lo, hi = np.quantile(values, [(1 - self.ci) / 2, (1 + self.ci) / 2], method="nearest")
        return float(lo), float(hi)

    @property
    def well_determined(self) -> bool:
        """Exponents in a plausible range (0.05 .. 2) with finite 95% intervals inside (0, 5)."""
        if not (0.05 <= self.params.alpha <= 2 and 0.05 <= self.params.beta <= 2):
            return False
        if len(self.samples) == 0:
            return True
        return all(0 < self.interval(n)[0] and self.interval(n)[1] < 5 for n in ("alpha", "beta"))


# ----------------------------------------------------------------------------- optimiser
def _model(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``LSE`` (M, n) and its softmax weights (M, n, 3) for parameters ``theta`` (M, 5) =
    ``(a, b, e, alpha, beta)``."""
    t1 = theta[:, 0:1] - theta[:, 3:4] * ln_n
    t2 = theta[:, 1:2] - theta[:, 4:5] * ln_d
    t3 = np.broadcast_to(theta[:, 2:3], t1.shape)
    top = np.maximum(np.maximum(t1, t2), t3)
    e1, e2, e3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(t3 - top)
    total = e1 + e2 + e3
    return top + np.log(total), np.stack([e1, e2, e3], axis=-1) / total[..., None]


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """``r^2 / 2`` for ``|r| <= delta``, ``delta (|r| - delta / 2)`` beyond."""
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def _objective(theta, ln_n, ln_d, ln_l, weights, delta) -> np.ndarray:
    lse, _ = _model(theta, ln_n, ln_d)
    value = (weights * huber(lse - ln_l, delta)).sum(axis=-1)
    return np.where(np.isfinite(value), value, np.inf)


def minimize_huber(theta0: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_l: np.ndarray,
                   weights: np.ndarray, delta: float = 1e-3, max_iter: int = 400,
                   tol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg-Marquardt / IRLS on the Huber objective from each row of ``theta0`` (M, 5).

    ``weights`` is (n,) or (M, n). Returns the end points (M, 5) and objectives (M,).
    """
    # NOTE: starts far from the data overflow exp() on the way; their objective becomes inf and
    # the step is rejected, so the warnings carry no information.
    with np.errstate(over="ignore", invalid="ignore"):
        return _levenberg_marquardt(theta0, ln_n, ln_d, ln_l, weights, delta, max_iter, tol)


def _levenberg_marquardt(theta0: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_l: np.ndarray,
                         weights: np.ndarray, delta: float, max_iter: int,
                         tol: float) -> tuple[np.ndarray, np.ndarray]:
    """The batched iteration of :func:`minimize_huber`; a start stops when a step gains less
    than ``tol`` relative, or its damping reaches 1e12 (no step helps any more)."""
    theta = np.array(theta0, dtype=float)
    m = len(theta)
    weights = np.broadcast_to(np.asarray(weights, float), (m, len(ln_l)))
    f = _objective(theta, ln_n, ln_d, ln_l, weights, delta)
    lam = np.full(m, 1e-3)
    active = np.ones(m, dtype=bool)
    eye = np.eye(5)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if len(idx) == 0:
            break
        th, w = theta[idx], weights[idx]
        lse, soft = _model(th, ln_n, ln_d)
        r = lse - ln_l
        jac = np.concatenate([soft, -soft[..., :2] * np.stack([ln_n, ln_d], -1)], axis=-1)  # a b e alpha beta
        psi = np.clip(r, -delta, delta)
        irls = w * np.where(np.abs(r) <= delta, 1.0, delta / np.maximum(np.abs(r), delta))
        grad = np.matmul((w * psi)[:, None, :], jac)[:, 0]
        hess = np.matmul(jac.transpose(0, 2, 1) * irls[:, None, :], jac)
        damping = lam[idx, None, None] * (hess * eye + 1e-9 * eye)
        try:
            step = np.linalg.solve(hess + damping, -grad[..., None])[..., 0]
        except np.linalg.LinAlgError:  # an exactly singular system: least-norm steps instead
            step = np.einsum("mkl,ml->mk", np.linalg.pinv(hess + damping), -grad)
        trial = th + step
        f_trial = _objective(trial, ln_n, ln_d, ln_l, w, delta)
        better = f_trial < f[idx]
        gain = np.where(better, f[idx] - f_trial, 0.0)
        theta[idx[better]] = trial[better]
        f[idx[better]] = f_trial[better]
        lam[idx] = np.clip(np.where(better, lam[idx] / 3, lam[idx] * 4), 1e-12, 1e12)
        done = (better & (gain <= tol * np.maximum(f[idx], 1e-30))) | (lam[idx] >= 1e12)
        done |= better & (np.abs(step).max(axis=-1) < 1e-12)
        active[idx[done]] = False
    return theta, f


def _to_params(theta: np.ndarray) -> LawParams:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return LawParams(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta)


def init_grid() -> np.ndarray:
    """Hoffmann et al.'s starts as (M, 5) rows of ``(a, b, e, alpha, beta)``."""
    return np.array(list(itertools.product(INIT_A, INIT_B, INIT_E, INIT_ALPHA, INIT_BETA)))


def fit_parametric(n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float = 1e-3,
                   n_boot: int = 200, ci: float = 0.95, seed: int = 0,
                   inits: np.ndarray | None = None) -> ParametricFit:
    """Best ``L(N, D)`` over the starts (method in the module docstring), with bootstrap samples."""
    ln_n, ln_d, ln_l = np.log(n), np.log(d), np.log(loss)
    starts = init_grid() if inits is None else np.asarray(inits, float)
    ends, objectives = minimize_huber(starts, ln_n, ln_d, ln_l, np.ones(len(ln_l)), delta)
    best = int(np.argmin(objectives))
    f_best = float(objectives[best])
    at_best = int((objectives <= f_best + 1e-6 * max(f_best, 1e-12) + 1e-15).sum())
    samples = np.empty((0, 5))
    if n_boot:
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(len(ln_l), np.full(len(ln_l), 1 / len(ln_l)), size=n_boot).astype(float)
        boot, _ = minimize_huber(np.repeat(ends[best:best + 1], n_boot, axis=0), ln_n, ln_d, ln_l,
                                 counts, delta)
        with np.errstate(over="ignore"):
            samples = np.stack([np.exp(boot[:, 2]), np.exp(boot[:, 0]), np.exp(boot[:, 1]),
                                boot[:, 3], boot[:, 4]], axis=-1)
    return ParametricFit(params=_to_params(ends[best]), objective=f_best, delta=delta,
                         n_inits=len(starts), n_at_best=at_best, samples=samples, ci=ci)


# ----------------------------------------------------------------------------- compute-optimal
def compute_optimal(params: LawParams, compute: float,
                    cost_per_token: Callable[[np.ndarray], np.ndarray] | None = None,
                    n_bounds: tuple[float, float] = (1e4, 1e14)) -> tuple[float, float, float]:
    """``(N_opt, D_opt, L_opt)`` at ``compute`` FLOPs.

    ``cost_per_token(N)`` is the training FLOPs per token of a model of size ``N``; ``None``
    means ``6N``, solved in closed form. Otherwise ``L(N, compute / f(N))`` is minimised over
    ``ln N`` on a fine grid, refined by a parabola through the best three grid points.
    """
    if cost_per_token is None:
        n_opt, d_opt = params.optimal_6nd(compute)
        return float(n_opt), float(d_opt), float(params.loss(n_opt, d_opt))
    ln_n = np.linspace(np.log(n_bounds[0]), np.log(n_bounds[1]), 4001)
    n = np.exp(ln_n)
    values = params.loss(n, compute / cost_per_token(n))
    i = int(np.clip(np.argmin(values), 1, len(n) - 2))
    y0, y1, y2 = values[i - 1:i + 2]
    h = ln_n[1] - ln_n[0]
    curvature = y0 - 2 * y1 + y2
    shift = 0.5 * h * (y0 - y2) / curvature if curvature > 0 else 0.0
    n_opt = float(np.exp(ln_n[i] + shift))
    d_opt = float(compute / cost_per_token(np.array([n_opt]))[0])
    return n_opt, d_opt, float(params.loss(n_opt, d_opt))
