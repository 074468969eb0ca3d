"""``scaling fit``: both Chinchilla methods on a results file, predictions, and the report.

* Approach 2 (:mod:`.isoflop`): minima of per-budget parabolas, ``N_opt = k C^a``,
  ``D_opt = k' C^b``, ``b / a``, bootstrap intervals. SODA found a = 0.367, b = 0.579.
* Approach 3 (:mod:`.parametric`): ``L(N, D) = E + A/N^alpha + B/D^beta``; its compute-optimal
  frontier is placed with the same FLOP counting as the budgets.

FLOP counting of the frontier and of predictions: when the sweep's ``manifest.json`` is found
(``--manifest``, or next to the results file) and its budgets were counted exactly, a model of
size N costs ``f(N)`` FLOPs per token, the exact count of the grid rule's shape of that size
(log-log interpolation over every width that is a multiple of the head dim, up to 32768), so
``C = f(N) D``. Otherwise ``C = 6 N D``. A prediction target ``PRESET:TOKENS`` (e.g.
``soda-4b:5e11``) is costed the same way from its preset's shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from soda_mega.config import load_config
from soda_mega.config.fields import ConfigError
from soda_mega.config.schema import ModelConfig
from soda_mega.scaling.budget import per_token_costs, size_label
from soda_mega.scaling.grid import GridSpec, family_curve
from soda_mega.scaling.isoflop import IsoflopFit, fit_isoflop, minimum_notes
from soda_mega.scaling.manifest import Manifest, read_manifest
from soda_mega.scaling.parametric import LawParams, ParametricFit, compute_optimal, fit_parametric
from soda_mega.scaling.results import Results
from soda_mega.tokens.layout import VocabLayout

SODA_EXPONENTS = {"a": 0.367, "b": 0.579}

CostFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Target:
    """A prediction target: a budget, and optionally the run (N, D) that spends it."""

    label: str
    compute: float
    n_params: float | None = None
    tokens: float | None = None


def family_cost(manifest: Manifest) -> CostFn | None:
    """Exact FLOPs per token as a function of N for the manifest's grid rule (None for 6nd)."""
    grid = dict(manifest.header.get("grid", {}))
    if grid.get("flops") != "exact" or "base_model" not in manifest.header:
        return None
    spec = GridSpec(**grid).validate()
    _, sizes, costs = family_curve(spec, ModelConfig(**manifest.header["base_model"]),
                                   int(manifest.header["vocab_size"]))
    ln_n, ln_f = np.log(sizes), np.log(costs)
    lo_slope = (ln_f[1] - ln_f[0]) / (ln_n[1] - ln_n[0])
    hi_slope = (ln_f[-1] - ln_f[-2]) / (ln_n[-1] - ln_n[-2])

    def cost(n: np.ndarray) -> np.ndarray:
        x = np.log(np.asarray(n, float))
        y = np.interp(x, ln_n, ln_f)
        y = np.where(x < ln_n[0], ln_f[0] + lo_slope * (x - ln_n[0]), y)
        y = np.where(x > ln_n[-1], ln_f[-1] + hi_slope * (x - ln_n[-1]), y)
        return np.exp(y)

    return cost


def parse_target(text: str, exact: bool) -> Target:
    """``1.3e22`` (a budget) or ``PRESET:TOKENS`` / ``CONFIG.yaml:TOKENS`` (a run to cost)."""
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--predict: a budget must be a positive number, got {text!r}")
        return Target(label=f"C={value:.3g}", compute=value)
    name, sep, tokens_text = text.rpartition(":")
    if not sep:
        raise ConfigError(f"--predict: {text!r} is neither a FLOP budget nor PRESET:TOKENS (e.g. soda-4b:5e11)")
    try:
        tokens = float(tokens_text)
    except ValueError:
        raise ConfigError(f"--predict: token count {tokens_text!r} in {text!r} is not a number") from None
    is_file = name.endswith((".yaml", ".yml", ".toml"))
    cfg = load_config(name if is_file else None, None if is_file else name)
    layout = VocabLayout.from_config(cfg.vocab)
    f_exact, six_n = per_token_costs(cfg.model, layout)
    compute = (f_exact if exact else six_n) * tokens
    return Target(label=f"{cfg.model.name}/{tokens:.3g} tokens", compute=compute,
                  n_params=float(size_label(cfg.model, layout)), tokens=tokens)


def _equivalent_compute(params: LawParams, loss: float, compute: float, cost: CostFn | None) -> float:
    """The budget at which a compute-optimal model reaches ``loss`` (bisection in ln C)."""
    lo, hi = math.log(compute) - 30, math.log(compute) + 10
    if loss <= params.E:
        return math.inf
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if compute_optimal(params, math.exp(mid), cost)[2] > loss:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def predict(target: Target, iso: IsoflopFit, par: ParametricFit, cost: CostFn | None) -> dict[str, Any]:
    """Compute-optimal N and D at the target budget by both methods; how far a given run is."""
    two = iso.predict(target.compute)
    two = {**two, "n_opt_ci": _range(two["n_opt_ci"]), "d_opt_ci": _range(two["d_opt_ci"])}
    n3, d3, l3 = compute_optimal(par.params, target.compute, cost)
    out: dict[str, Any] = {"label": target.label, "compute": target.compute, "approach2": two,
                           "approach3": {"n_opt": n3, "d_opt": d3, "loss_opt": l3}}
    if target.n_params is not None and target.tokens is not None:
        loss = float(par.params.loss(target.n_params, target.tokens))
        equivalent = _equivalent_compute(par.params, loss, target.compute, cost)
        efficiency = equivalent / target.compute if math.isfinite(equivalent) else None
        out["run"] = {
            "n_params": target.n_params, "tokens": target.tokens,
            "tokens_per_param": target.tokens / target.n_params,
            "n_over_n_opt_approach2": target.n_params / two["n_opt"],
            "d_over_d_opt_approach2": target.tokens / two["d_opt"],
            "n_over_n_opt_approach3": target.n_params / n3,
            "d_over_d_opt_approach3": target.tokens / d3,
            "loss_predicted": loss, "excess_loss": loss - l3,
            "compute_optimal_equivalent": equivalent if math.isfinite(equivalent) else None,
            "compute_efficiency": efficiency,
        }
    return out


def _range(pair: tuple[float, float]) -> list[float] | None:
    """An interval for JSON: None when there is none (NaN or unbounded ends)."""
    lo, hi = float(pair[0]), float(pair[1])
    return [lo, hi] if math.isfinite(lo) and math.isfinite(hi) else None


def run_fit(results: Results, manifest: Manifest | None = None, targets: tuple[str, ...] = ("soda-4b:5e11",),
            n_boot: int = 2000, ci: float = 0.95, seed: int = 0, huber_delta: float = 1e-3) -> dict[str, Any]:
    """Both methods and the predictions as one JSON-able report."""
    cost = family_cost(manifest) if manifest is not None else None
    exact = cost is not None
    iso = fit_isoflop(results, n_boot=n_boot, ci=ci, seed=seed)
    par = fit_parametric(results.n_params, results.tokens, results.loss, delta=huber_delta,
                         n_boot=min(n_boot, 500), ci=ci, seed=seed)
    frontier = [compute_optimal(par.params, float(c), cost) for c in results.budgets]
    ln_c = np.log(results.budgets)
    a3 = float(np.polyfit(ln_c, np.log([f[0] for f in frontier]), 1)[0])
    b3 = float(np.polyfit(ln_c, np.log([f[1] for f in frontier]), 1)[0])
    notes = minimum_notes(iso)
    if not exact:
        notes.append("FLOPs of the approach-3 frontier and of predictions counted as C = 6ND (no manifest "
                     "next to the results, or its budgets were counted 6ND)")
    if not par.well_determined:
        p = par.params
        notes.append(f"approach 3 is not determined by these runs (alpha {p.alpha:.3g}, beta {p.beta:.3g}, "
                     f"alpha interval {_fmt_pair(par.interval('alpha'))}): {len(results)} runs for 5 "
                     "parameters; ignore its frontier and predictions")
    if par.n_at_best < 10:
        notes.append(f"only {par.n_at_best} of {par.n_inits} starts reached the best approach-3 fit: "
                     "the optimum may be poorly determined")
    span = math.log10(results.budgets[-1] / results.budgets[0])
    predictions = []
    for text in targets:
        target = parse_target(text, exact)
        predictions.append(predict(target, iso, par, cost))
        reach = math.log10(target.compute / results.budgets[-1])
        if reach > 0.5:
            notes.append(f"{target.label}: {reach:.1f} decades beyond the largest budget (the fit spans "
                         f"{span:.1f}); an extrapolation")
    seconds = results.extra.get("seconds")
    return {
        "results": str(results.path), "runs": len(results), "budgets": [float(b) for b in results.budgets],
        "train_seconds": float(np.nansum(seconds)) if seconds is not None else None,
        "flops_counting": "exact (grid-rule shapes, full attention)" if exact else "6ND",
        "approach2": {
            "per_budget": [{
                "budget": m.budget, "runs": m.n_points, "n_opt": m.n_opt, "n_opt_ci": _range(m.n_opt_ci),
                "d_opt": m.d_opt, "d_opt_ci": _range(m.d_opt_ci), "loss_min": m.loss_opt,
                "n_opt_inside_sizes": m.n_inside, "d_opt_inside_tokens": m.d_inside,
                "parabola_ln_n": {"center": m.over_n.center, "coef": list(m.over_n.coef)},
                "parabola_ln_d": {"center": m.over_d.center, "coef": list(m.over_d.coef)},
                "bootstrap_kept": m.bootstrap_kept} for m in iso.minima],
            "n_opt_law": {"k": iso.n_law.k, "a": iso.n_law.exponent, "k_ci": _range(iso.n_law.k_ci),
                          "a_ci": _range(iso.n_law.exponent_ci)},
            "d_opt_law": {"k": iso.d_law.k, "b": iso.d_law.exponent, "k_ci": _range(iso.d_law.k_ci),
                          "b_ci": _range(iso.d_law.exponent_ci)},
            "b_over_a": iso.ratio, "b_over_a_ci": _range(iso.ratio_ci),
            "a_plus_b": iso.n_law.exponent + iso.d_law.exponent,
            "bootstrap": {"replicates": iso.n_boot, "kept": iso.bootstrap_kept, "ci": ci,
                          "method": "case resampling of runs within each budget"},
        },
        "approach3": {
            "params": par.params.to_dict(),
            "intervals": {name: _range(par.interval(name)) for name in
                          ("E", "A", "B", "alpha", "beta", "a_opt", "b_opt")},
            "huber_delta": par.delta, "objective": par.objective, "starts": par.n_inits,
            "starts_at_best": par.n_at_best, "bootstrap_replicates": len(par.samples),
            "well_determined": par.well_determined,
            "frontier": [{"budget": float(c), "n_opt": f[0], "d_opt": f[1], "loss_opt": f[2]}
                         for c, f in zip(results.budgets, frontier)],
            "a_over_budgets": a3, "b_over_budgets": b3,
        },
        "predictions": predictions,
        "soda_reference": SODA_EXPONENTS,
        "notes": notes,
    }


def load_manifest_for(results_path: Path, manifest_path: str | None) -> Manifest | None:
    """``--manifest`` if given, else ``manifest.json`` next to the results file, else None."""
    if manifest_path:
        return read_manifest(manifest_path)
    candidate = results_path.parent / "manifest.json"
    return read_manifest(candidate) if candidate.is_file() else None


def _fmt_pair(pair, fmt: str = ".3g") -> str:
    """``[lo, hi]``, or ``n/a`` when there is no interval."""
    if pair is None or any(v is None or not math.isfinite(v) for v in pair):
        return "n/a"
    return f"[{pair[0]:{fmt}}, {pair[1]:{fmt}}]"


def format_report(report: dict[str, Any]) -> str:
    """The report as text."""
    a2, a3 = report["approach2"], report["approach3"]
    ci = int(round(a2["bootstrap"]["ci"] * 100))
    lines = [f"{report['results']}: {report['runs']} runs, {len(report['budgets'])} budgets; "
             f"FLOPs counted {report['flops_counting']}", "",
             f"approach 2, IsoFLOP parabolas ({ci}% bootstrap intervals, "
             f"{a2['bootstrap']['replicates']} replicates, {a2['bootstrap']['kept']:.0%} usable)",
             f"  {'budget':>9}{'runs':>5}{'N_opt':>10}{'N_opt interval':>22}{'D_opt':>10}"
             f"{'D_opt interval':>22}{'L_min':>8}"]
    for m in a2["per_budget"]:
        flag = "" if m["n_opt_inside_sizes"] and m["d_opt_inside_tokens"] else "  (extrapolated)"
        lines.append(f"  {m['budget']:>9.3g}{m['runs']:>5}{m['n_opt']:>10.3g}{_fmt_pair(m['n_opt_ci']):>22}"
                     f"{m['d_opt']:>10.3g}{_fmt_pair(m['d_opt_ci']):>22}{m['loss_min']:>8.4f}{flag}")
    n, d = a2["n_opt_law"], a2["d_opt_law"]
    ref = report["soda_reference"]
    lines += [
        f"  N_opt = {n['k']:.3g} * C^{n['a']:.3f}   a in {_fmt_pair(n['a_ci'], '.3f')}   (SODA a = {ref['a']})",
        f"  D_opt = {d['k']:.3g} * C^{d['b']:.3f}   b in {_fmt_pair(d['b_ci'], '.3f')}   (SODA b = {ref['b']})",
        f"  b / a = {a2['b_over_a']:.3f} in {_fmt_pair(a2['b_over_a_ci'], '.3f')}"
        f"   (SODA {ref['b'] / ref['a']:.2f}); a + b = {a2['a_plus_b']:.3f}",
        "",
        f"approach 3, L(N, D) = E + A/N^alpha + B/D^beta (Huber delta {a3['huber_delta']:g} on ln L, "
        f"{a3['starts']} starts, {a3['starts_at_best']} reached the best"
        + ("" if a3["well_determined"] else "; NOT determined, see notes") + ")",
    ]
    p, iv = a3["params"], a3["intervals"]
    for name in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"  {name:<6}{p[name]:>12.4g}   {_fmt_pair(iv[name], '.4g')}")
    lines += [
        f"  under C = 6ND: a = beta/(alpha+beta) = {p['a_opt_6nd']:.3f} {_fmt_pair(iv['a_opt'], '.3f')}, "
        f"b = alpha/(alpha+beta) = {p['b_opt_6nd']:.3f} {_fmt_pair(iv['b_opt'], '.3f')}",
        f"  frontier slopes over the budgets ({report['flops_counting']}): a = {a3['a_over_budgets']:.3f}, "
        f"b = {a3['b_over_budgets']:.3f}",
    ]
    for pred in report["predictions"]:
        two, three = pred["approach2"], pred["approach3"]
        lines += ["", f"prediction for {pred['label']}: C = {pred['compute']:.4g} FLOPs",
                  f"  approach 2: N_opt {two['n_opt']:.3g} {_fmt_pair(two['n_opt_ci'])}, "
                  f"D_opt {two['d_opt']:.3g} {_fmt_pair(two['d_opt_ci'])}",
                  f"  approach 3: N_opt {three['n_opt']:.3g}, D_opt {three['d_opt']:.3g}, "
                  f"L_opt {three['loss_opt']:.4f}"]
        run = pred.get("run")
        if run:
            efficiency = run["compute_efficiency"]
            lines += [
                f"  the run: N {run['n_params']:.3g}, D {run['tokens']:.3g} "
                f"({run['tokens_per_param']:.0f} tokens/param)",
                f"    N / N_opt = {run['n_over_n_opt_approach2']:.2f} (approach 2), "
                f"{run['n_over_n_opt_approach3']:.2f} "
                f"(approach 3); D / D_opt = {run['d_over_d_opt_approach2']:.2f}, {run['d_over_d_opt_approach3']:.2f}",
                f"    predicted loss {run['loss_predicted']:.4f}, {run['excess_loss']:+.4f} above compute-optimal; "
                + (f"a compute-optimal model reaches it with {efficiency:.0%} of the FLOPs" if efficiency is not None
                   else "no compute-optimal equivalent (the fitted law is flat there)"),
            ]
    if report["notes"]:
        lines += ["", "notes:"] + [f"  - {note}" for note in report["notes"]]
    return "\n".join(lines)
