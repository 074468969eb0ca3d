"""Figures of a scaling fit (matplotlib, Agg backend, PNG).

One 2 x 2 figure (:func:`plot_fit`):

* (a) IsoFLOP curves over N: each budget's runs, its parabola in ln N, the minimum with its
  bootstrap interval;
* (b) the same over D;
* (c) the frontiers: approach 2 minima with intervals and the power laws ``N_opt = k C^a``,
  ``D_opt = k' C^b``; approach 3's compute-optimal N and D; prediction targets;
* (d) approach 3's loss surface ``L(N, D)`` as contours, the budgets' IsoFLOP lines, the runs
  (coloured by measured loss) and the compute-optimal path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from soda_mega.scaling.parametric import LawParams, compute_optimal  # noqa: E402
from soda_mega.scaling.results import Results  # noqa: E402


def _budget_colours(budgets: np.ndarray) -> dict[float, Any]:
    cmap = plt.get_cmap("viridis")
    span = max(len(budgets) - 1, 1)
    return {float(b): cmap(0.9 * i / span) for i, b in enumerate(budgets)}


def _isoflop_panel(ax, results: Results, report: dict, variable: str, colours: dict) -> None:
    key, values = ("n", results.n_params) if variable == "N" else ("d", results.tokens)
    for m in report["approach2"]["per_budget"]:
        budget = m["budget"]
        idx = results.of_budget(budget)
        colour = colours[budget]
        x = values[idx]
        ax.scatter(x, results.loss[idx], color=colour, s=18, zorder=3, label=f"C = {budget:.2g}")
        parabola = m[f"parabola_ln_{key}"]
        c0, c1, c2 = parabola["coef"]
        lo, hi = np.log(x.min()), np.log(x.max())
        pad = 0.15 * (hi - lo)
        grid = np.linspace(lo - pad, hi + pad, 200)
        u = grid - parabola["center"]
        ax.plot(np.exp(grid), c0 + c1 * u + c2 * u * u, color=colour, lw=1.2)
        opt, ci = m[f"{key}_opt"], m[f"{key}_opt_ci"] or (m[f"{key}_opt"],) * 2
        ax.errorbar([opt], [m["loss_min"]], xerr=[[opt - ci[0]], [ci[1] - opt]], fmt="*", ms=11,
                    color=colour, mec="black", mew=0.6, capsize=3, zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("N, parameters (non-embedding + output layer)" if variable == "N" else "D, training tokens")
    ax.set_ylabel("held-out NLL per token (nats)")
    ax.set_title(f"({'a' if variable == 'N' else 'b'}) IsoFLOP curves over {variable}, parabola minima")
    ax.grid(True, which="both", alpha=0.25)


def _frontier_panel(ax, report: dict, params: LawParams, cost: Callable | None) -> None:
    a2 = report["approach2"]
    budgets = np.array([m["budget"] for m in a2["per_budget"]])
    c_max = max([budgets.max()] + [p["compute"] for p in report["predictions"]])
    line_c = np.geomspace(budgets.min() / 2, c_max * 2, 100)
    for key, law, colour, name in (("n", a2["n_opt_law"], "tab:blue", "N"),
                                   ("d", a2["d_opt_law"], "tab:orange", "D")):
        opt = np.array([m[f"{key}_opt"] for m in a2["per_budget"]])
        ci = np.array([m[f"{key}_opt_ci"] or (m[f"{key}_opt"],) * 2 for m in a2["per_budget"]])
        yerr = np.abs(np.stack([opt - ci[:, 0], ci[:, 1] - opt]))
        ax.errorbar(budgets, opt, yerr=yerr, fmt="o", color=colour, capsize=3, ms=5)
        exponent = law["a"] if key == "n" else law["b"]
        ax.plot(line_c, law["k"] * line_c ** exponent, color=colour, lw=1.5,
                label=f"{name}_opt = {law['k']:.2g} C^{exponent:.3f} (approach 2)")
        three = np.array([compute_optimal(params, c, cost)[0 if key == "n" else 1] for c in line_c])
        ax.plot(line_c, three, color=colour, lw=1.2, ls="--", label=f"{name}_opt, approach 3")
    for pred in report["predictions"]:
        run = pred.get("run")
        if run:
            ax.scatter([pred["compute"]] * 2, [run["n_params"], run["tokens"]], marker="X", s=70,
                       color=["tab:blue", "tab:orange"], edgecolor="black", zorder=5)
            ax.annotate(pred["label"], (pred["compute"], run["tokens"]), textcoords="offset points",
                        xytext=(-10, 8), ha="right", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"C, training FLOPs ({report['flops_counting']})")
    ax.set_ylabel("compute-optimal N (parameters) and D (tokens)")
    ax.set_title("(c) compute-optimal frontiers")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.25)


def _contour_panel(ax, results: Results, report: dict, params: LawParams, cost: Callable | None,
                   colours: dict) -> None:
    n_lo, n_hi = results.n_params.min() / 3, results.n_params.max() * 3
    d_lo, d_hi = results.tokens.min() / 3, results.tokens.max() * 3
    n_grid, d_grid = np.meshgrid(np.geomspace(n_lo, n_hi, 200), np.geomspace(d_lo, d_hi, 200))
    surface = params.loss(n_grid, d_grid)
    spread = results.loss.max() - results.loss.min()
    levels = np.linspace(results.loss.min() - 0.3 * spread, results.loss.max() + 0.3 * spread, 13)
    contours = ax.contour(n_grid, d_grid, surface, levels=levels, colors="grey", linewidths=0.8)
    ax.clabel(contours, fmt="%.2f", fontsize=7)
    n_line = np.geomspace(n_lo, n_hi, 200)
    per_token = (lambda n: 6 * n) if cost is None else cost
    for budget in results.budgets:
        ax.plot(n_line, budget / per_token(n_line), color=colours[float(budget)], lw=1, ls=":")
    points = ax.scatter(results.n_params, results.tokens, c=results.loss, cmap="plasma", s=22,
                        edgecolor="black", linewidths=0.4, zorder=3)
    plt.colorbar(points, ax=ax, label="measured held-out NLL")
    frontier_c = np.geomspace(results.budgets.min() / 3, results.budgets.max() * 3, 60)
    path = np.array([compute_optimal(params, c, cost)[:2] for c in frontier_c])
    ax.plot(path[:, 0], path[:, 1], color="tab:red", lw=1.8, label="compute-optimal (approach 3)")
    minima = report["approach2"]["per_budget"]
    ax.scatter([m["n_opt"] for m in minima], [m["d_opt"] for m in minima], marker="*", s=90,
               color="tab:blue", edgecolor="black", zorder=4, label="approach 2 minima")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(n_lo, n_hi)
    ax.set_ylim(d_lo, d_hi)
    ax.set_xlabel("N, parameters")
    ax.set_ylabel("D, training tokens")
    p = params
    verdict = "" if report["approach3"]["well_determined"] else " (NOT determined by these runs)"
    ax.set_title(f"(d) L = {p.E:.2f} + {p.A:.3g}/N^{p.alpha:.2f} + {p.B:.3g}/D^{p.beta:.2f}{verdict}\n"
                 "dotted: IsoFLOP lines", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")


def plot_fit(results: Results, report: dict, cost: Callable | None, path: str | Path,
             title: str = "") -> Path:
    """Write the 2 x 2 figure of the module docstring to ``path`` (PNG)."""
    p = report["approach3"]["params"]
    params = LawParams(E=p["E"], A=p["A"], B=p["B"], alpha=p["alpha"], beta=p["beta"])
    colours = _budget_colours(results.budgets)
    fig, axes = plt.subplots(2, 2, figsize=(13, 10.5))
    _isoflop_panel(axes[0, 0], results, report, "N", colours)
    _isoflop_panel(axes[0, 1], results, report, "D", colours)
    axes[0, 0].legend(fontsize=7, loc="lower left")
    _frontier_panel(axes[1, 0], report, params, cost)
    _contour_panel(axes[1, 1], results, report, params, cost, colours)
    a2 = report["approach2"]
    fig.suptitle(title or (f"IsoFLOP fit: a = {a2['n_opt_law']['a']:.3f}, b = {a2['d_opt_law']['b']:.3f} "
                           f"(SODA: 0.367, 0.579); {report['runs']} runs"), fontsize=12)
    # NOTE: a log axis spanning one to two decades labels its minor ticks; in the narrow contour
    # panel those labels overlap.
    axes[1, 1].xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
