"""``soda-mega scaling ACTION``: the IsoFLOP study of SODA_SPEC section 4.

``grid`` writes one config per run and a manifest; ``sweep`` trains the runs and records each
held-out NLL in a results CSV; ``fit`` fits both Chinchilla methods, predicts, and plots.
The library behind it is :mod:`soda_mega.scaling`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from soda_mega.commands.argtypes import positive_int
from soda_mega.config import preset_names
from soda_mega.config.fields import ConfigError

GRID_EPILOG = """\
the rule (SODA_SPEC section 4), for width d and batch B sequences:
  L = round(d / (64 + 4*log2(d) - 7)), heads = kv heads = d/128, head dim 128, FFN = 4d,
  lr = min(0.33*sqrt(B)/d, 0.01), beta1 0.95, beta2 = 0.98^(B/128), weight decay 0.1,
  WSD (10% warmup, last 20% linear decay), no z-loss.
  D = training tokens making the run's FLOPs equal the budget, in whole steps of B x seq:
  --flops exact: C = f_exact(model) * D, f_exact = matmul FLOPs per token with full
  (non-causal) attention at the sequence length, LM head over the unpadded vocabulary,
  x3 for forward + backward; --flops 6nd: C = 6 N D.
  N = non-embedding parameters + output layer (SODA's size label); total adds the embedding.
batch (--batch auto): the power of two >= D / (target_steps * seq), at least --min-batch, halved
  while 0.33*sqrt(B)/d > 0.01, so runs take target_steps/2 .. target_steps steps.
widths kept: D/N within --tokens-per-param (default 2:256, centred on Chinchilla's ~20);
  dropped candidates are listed with the reason.
grids (data, in soda_mega/scaling/grids/): soda (7 budgets 3e18..3e20, 64 runs), micro (3 CPU
  budgets x 3 sizes on the demo corpus, tiny vocabulary). Any --section.key=value override
  changes the base config of every run (e.g. --data.train=[a,b]).
output: DIR/manifest.json, DIR/configs/<run>.yaml (loadable by `soda-mega train --config`),
  DIR/grid.txt (the table printed here).
"""

SWEEP_EPILOG = """\
Each run: `python -m soda_mega.cli train --config DIR/configs/<run>.yaml --run.dir=DIR/runs/<run>
[overrides]` (local), or the same under `python -m torch.distributed.run --standalone
--nproc-per-node N` (torchrun). Output goes to DIR/runs/<run>/train.log. On success the last
valid_loss of DIR/runs/<run>/metrics.jsonl (it must be at the run's final step) is appended to
the results CSV. Runs already in the results file are skipped, so rerunning the same command
resumes a sweep; a failed run is listed with its log and the others go on (exit code 1 at the
end). --launcher slurm writes DIR/sweep.sbatch, a job array with one task per run (each task
calls this command with --index), and submits it with sbatch (--dry-run: print only).
"""

FIT_EPILOG = """\
RESULTS needs the columns budget, n_params, tokens, valid_loss (what `scaling sweep` writes),
at least 3 model sizes per budget and 2 budgets. Output (with --out DIR): DIR/fit.json (the
whole report, stamped with commit and versions), DIR/fit.txt, DIR/scaling_fit.png (IsoFLOP
curves over N and D, frontiers, loss contours). Approach 2: per-budget parabolas of loss over
ln N and ln D, minima with case-bootstrap intervals (a budget with only 3 sizes gets none, and
then neither do the power laws: use 4+ sizes per budget), N_opt = k C^a, D_opt = k' C^b, b/a.
Approach 3: L(N,D) = E + A/N^alpha + B/D^beta, Huber (delta 1e-3) on ln L from 4,500 starts.
--predict: a budget (1.3e22) or PRESET:TOKENS / CONFIG.yaml:TOKENS (default soda-4b:5e11,
SODA's 4B run on 500B tokens), costed with the sweep's FLOP counting.
"""


def _budgets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 3e18,6e18, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be positive numbers, got {text!r}")
    return values


def _widths(text: str) -> list[int]:
    """``128,256,512`` or ``START:STOP:STEP`` (inclusive)."""
    try:
        if ":" in text:
            start, stop, step = (int(v) for v in text.split(":"))
            return list(range(start, stop + 1, step))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 128,256,512 or 128:2048:128, got {text!r}") from None


def _band(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI such as 2:256, got {text!r}") from None
    return lo, hi


def _batch(text: str) -> int | None:
    return None if text == "auto" else positive_int(text)


# ----------------------------------------------------------------------------- grid
def register_grid(actions) -> argparse.ArgumentParser:
    from soda_mega.scaling.grid import grid_names

    p = actions.add_parser("grid", help="write the IsoFLOP grid: one config per run + manifest",
                           description="Apply SODA's grid rule to every budget x width, keep the widths "
                                       "in the tokens-per-parameter band, and write one run config each "
                                       "plus a manifest; print how exact and 6N FLOP counts differ.",
                           epilog=GRID_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="soda", metavar="NAME|FILE",
                   help=f"grid preset ({', '.join(grid_names())}) or a grid YAML file (default soda)")
    p.add_argument("--budgets", type=_budgets, metavar="C1,C2,...", help="training-FLOP budgets")
    p.add_argument("--flops", choices=("exact", "6nd"), help="how a run's FLOPs are counted (default exact)")
    p.add_argument("--widths", type=_widths, metavar="LIST|A:B:STEP", help="candidate widths d")
    p.add_argument("--batch", type=_batch, metavar="auto|B", help="global batch in sequences (default auto)")
    p.add_argument("--target-steps", type=int, metavar="N", help="batch rule: steps aimed at (default 65536)")
    p.add_argument("--min-batch", type=int, metavar="B", help="batch rule: smallest batch (default 8)")
    p.add_argument("--tokens-per-param", type=_band, metavar="LO:HI",
                   help="keep widths whose D/N lies in [LO, HI] (default 2:256)")
    p.add_argument("--base-config", metavar="FILE",
                   help="config every run starts from (replaces the grid's base_preset)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for manifest.json and configs/")
    p.add_argument("--json", action="store_true", help="print the manifest's runs as JSON instead of the table")
    p.set_defaults(_scaling_run=run_grid)
    return p


def run_grid(args) -> int:
    from soda_mega.scaling.grid import base_config, format_table, load_grid, plan_grid, write_grid

    changes = {}
    for attr, field in (("budgets", "budgets"), ("flops", "flops"), ("widths", "widths"),
                        ("target_steps", "target_steps"), ("min_batch", "min_batch_size")):
        if getattr(args, attr) is not None:
            changes[field] = getattr(args, attr)
    if args.batch is not None:
        changes["batch_size"] = args.batch
    if args.tokens_per_param is not None:
        changes["min_tokens_per_param"], changes["max_tokens_per_param"] = args.tokens_per_param
    spec = load_grid(args.grid, changes)
    base = base_config(spec, args.base_config, args.overrides)
    plan = plan_grid(spec, base)
    if not plan.runs:
        print(format_table(plan))
        print("soda-mega scaling grid: no run passed the filters; widen --tokens-per-param or change "
              "--widths", file=sys.stderr)
        return 2
    _refuse_to_replace_results(Path(args.out), [r.to_dict() for r, _ in plan.runs])
    source = {"config": args.base_config, "preset": None if args.base_config else spec.base_preset,
              "overrides": list(args.overrides)}
    manifest = write_grid(plan, args.out, source)
    table = format_table(plan)
    (Path(args.out) / "grid.txt").write_text(table + "\n")
    if args.json:
        print(json.dumps([r.to_dict() for r, _ in plan.runs], indent=1))
    else:
        print(table)
        print(f"wrote {manifest} and {len(plan.runs)} configs in {Path(args.out) / 'configs'}")
    return 0


def _refuse_to_replace_results(out: Path, runs: list[dict]) -> None:
    """Rewriting the same grid is fine (a rerun); a different one next to results is not."""
    from soda_mega.scaling.manifest import read_manifest

    if not (out / "manifest.json").is_file() or not (out / "results.csv").is_file():
        return
    old = [r.to_dict() for r in read_manifest(out / "manifest.json").runs]
    if old != runs:
        raise ConfigError(f"{out} holds the results of another grid (results.csv, manifest.json); "
                          "use another --out, or move the old results away")


# ----------------------------------------------------------------------------- sweep
def register_sweep(actions) -> argparse.ArgumentParser:
    p = actions.add_parser("sweep", help="train a manifest's runs and record each held-out NLL",
                           description="Launch every run of MANIFEST through `soda-mega train` and append "
                                       "its final valid_loss to the results CSV.",
                           epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", metavar="MANIFEST", help="manifest.json written by `scaling grid`")
    p.add_argument("--launcher", choices=("local", "torchrun", "slurm"), default="local",
                   help="local: one process per run, one after another; torchrun: --nproc processes "
                        "per run; slurm: a job array (default local)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes (GPUs) per run for torchrun and slurm (default 1)")
    p.add_argument("--results", metavar="CSV", help="results file (default: results.csv next to the manifest)")
    p.add_argument("--index", type=int, action="append", metavar="I",
                   help="run only the I-th run of the manifest (0-based; repeatable; slurm array tasks use it)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands (slurm: the script) without running anything")
    p.add_argument("--max-parallel", type=int, metavar="N", help="slurm: at most N array tasks at once")
    p.add_argument("--time", metavar="HH:MM:SS", help="slurm: time limit per array task")
    p.set_defaults(_scaling_run=run_sweep_command)
    return p


def run_sweep_command(args) -> int:
    from soda_mega.scaling.manifest import read_manifest
    from soda_mega.scaling.sweep import (
        ignored_settings_notice,
        recorded_runs,
        run_sweep,
        slurm_script,
        submit_slurm,
        train_command,
    )
    from soda_mega.utils.shell import command_line

    manifest = read_manifest(args.manifest)
    results = Path(args.results) if args.results else manifest.root / "results.csv"
    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {args.nproc}")
    for i in args.index or []:
        if not 0 <= i < len(manifest.runs):
            raise ConfigError(f"--index: {i} is outside the manifest's {len(manifest.runs)} runs (0-based)")
    if args.launcher == "slurm":
        script = slurm_script(manifest, results, args.nproc, args.overrides, args.max_parallel,
                              args.time, python=sys.executable)
        return submit_slurm(script, manifest, args.dry_run)
    if args.dry_run:
        done = recorded_runs(results)
        runs = manifest.runs if args.index is None else [manifest.runs[i] for i in args.index]
        for run in runs:
            state = "recorded, would skip" if run.run_id in done else "to run"
            print(f"# {run.run_id} ({state})")
            notice = ignored_settings_notice(manifest, run, args.overrides)
            if notice:
                print(f"soda-mega: {notice}", file=sys.stderr)
            print(command_line(train_command(manifest, run, args.launcher, args.nproc, args.overrides)))
        return 0
    report = run_sweep(manifest, results, args.launcher, args.nproc, args.overrides, args.index)
    return 0 if report.ok else 1


# ----------------------------------------------------------------------------- fit
def register_fit(actions) -> argparse.ArgumentParser:
    p = actions.add_parser("fit", help="fit IsoFLOP parabolas, power laws and L(N, D); predict; plot",
                           description="Chinchilla approaches 2 and 3 on a results CSV, predictions for a "
                                       "budget or a run, and plots.",
                           epilog=FIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", metavar="RESULTS", help="results CSV (from `scaling sweep`)")
    p.add_argument("--out", metavar="DIR", help="write fit.json, fit.txt and scaling_fit.png here")
    p.add_argument("--manifest", metavar="FILE",
                   help="the sweep's manifest.json, for exact FLOP counting (default: next to RESULTS)")
    p.add_argument("--predict", action="append", metavar="C|PRESET:TOKENS",
                   help="prediction target (repeatable; default soda-4b:5e11)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="R", help="bootstrap replicates (default 2000)")
    p.add_argument("--ci", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--title", default="", help="figure title")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(_scaling_run=run_fit_command)
    return p


def run_fit_command(args) -> int:
    from soda_mega.scaling.fit import family_cost, format_report, load_manifest_for, run_fit
    from soda_mega.scaling.results import load_results

    if args.overrides:
        raise ConfigError(f"scaling fit takes no config overrides, got {' '.join(args.overrides)}")
    if not 0 < args.ci < 1:
        raise ConfigError(f"--ci: must be in (0, 1), got {args.ci}")
    results = load_results(args.results)
    manifest = load_manifest_for(Path(args.results), args.manifest)
    report = run_fit(results, manifest, tuple(args.predict or ("soda-4b:5e11",)),
                     n_boot=args.bootstrap, ci=args.ci, seed=args.seed)
    text = format_report(report)
    print(json.dumps(report, indent=1) if args.json else text)
    if args.out:
        from soda_mega.scaling.plots import plot_fit
        from soda_mega.utils.provenance import write_json

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "fit.json", report)
        (out / "fit.txt").write_text(text + "\n")
        cost = family_cost(manifest) if manifest is not None else None
        figure = plot_fit(results, report, cost, out / "scaling_fit.png", args.title)
        print(f"wrote {out / 'fit.json'}, {out / 'fit.txt'}, {figure}")
    return 0


# ----------------------------------------------------------------------------- registry
ACTIONS = [register_grid, register_sweep, register_fit]


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("scaling", help="IsoFLOP scaling-law study: grid, sweep, fit",
                       description="SODA's IsoFLOP study (SODA_SPEC section 4): `grid` -> `sweep` -> `fit`. "
                                   f"Model presets: {', '.join(preset_names())}.")
    actions = p.add_subparsers(dest="scaling_action", metavar="ACTION")
    actions.required = True
    for register_action in ACTIONS:
        register_action(actions)
    return p


def run(args) -> int:
    from soda_mega.scaling.isoflop import FitError
    from soda_mega.scaling.manifest import ManifestError
    from soda_mega.scaling.results import ResultsError

    try:
        return int(args._scaling_run(args) or 0)
    except (ManifestError, ResultsError, FitError) as err:
        print(f"soda-mega scaling {args.scaling_action}: {err}", file=sys.stderr)
        return 2
