"""SODA's IsoFLOP grid (SODA_SPEC section 4): model shapes, hyper-parameters and tokens per budget.

For a width ``d`` (a multiple of the head dim, 128 in SODA) and batch ``B`` sequences:

    layers    L  = round(d / (64 + 4 * log2(d) - 7))      (half rounds up; at least 1)
    heads        = kv heads = d / 128, head dim 128, FFN = 4 d
    peak lr      = min(0.33 * sqrt(B) / d, 0.01)
    Adam         beta1 = 0.95, beta2 = 0.98 ** (B / 128), weight decay 0.1, no z-loss
    schedule     WSD, 10% linear warmup, last 20% linear decay to 0 (as SODA's main runs)

and ``D`` tokens chosen so that the run's training FLOPs equal the budget (:mod:`.budget`).
All constants are fields of :class:`GridSpec`; the ``soda`` and ``micro`` grids are data
(``soda_mega/scaling/grids/*.yaml``), not code.

Batch size (not in SODA_SPEC; ``batch_size: null`` = this rule, an integer = fixed): the
power of two at or above ``D / (target_steps * s)``, at least ``min_batch_size``, then
halved while ``0.33 * sqrt(B) / d > 0.01`` (down to ``min_batch_size``). So every run takes
between ``target_steps / 2`` and ``target_steps`` optimizer steps (65,536 by default) unless
the learning-rate cap or the minimum batch binds, and the rate stays below the cap by
lowering the batch rather than by clipping the rate wherever that is possible. This is the
rule of the public Marin IsoFLOP sweep script (``experiments/audio/isoflop_audio_sweep.py``)
whose width/layer/lr/beta2 rules SODA_SPEC section 4 reproduces.

Widths kept per budget: a candidate is dropped (and the reason printed) when its tokens per
parameter ``D/N`` fall outside ``[min_tokens_per_param, max_tokens_per_param]``: 2 to 256 by
default, a 128x band whose geometric centre (about 23) is Chinchilla's ~20 tokens per
parameter, so each budget's sizes bracket its optimum. With SODA's 7 budgets this keeps 64
of the 112 width x budget candidates (7 to 11 per budget), SODA's 64 runs. A candidate is
also dropped when whole steps miss the budget by more than ``flop_tolerance``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from soda_mega.config.fields import ConfigError, fld, short, validate_section
from soda_mega.config.loader import apply_mapping, dump_config, load_config, parse_overrides
from soda_mega.config.schema import ModelConfig, SodaConfig
from soda_mega.config.yaml_io import load_yaml
from soda_mega.model.accounting import count_parameters, flops_per_token
from soda_mega.scaling.budget import FLOPS_MODES, TokenPlan, plan_tokens, tokens_for_budget
from soda_mega.scaling.manifest import ManifestRun, write_manifest
from soda_mega.tokens.layout import VocabLayout
from soda_mega.utils.shell import UnsafeValueError, plain_name

_GRID_PACKAGE = "soda_mega.scaling"

#: Config fields the grid rule sets; a command-line override of one of them is refused.
GRID_FIELDS = {
    "model": ("name", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
              "head_dim", "ffn_hidden_size"),
    "training": ("global_batch_size", "train_tokens", "lr", "adam_beta1", "adam_beta2",
                 "weight_decay", "z_loss", "lr_schedule", "warmup_fraction", "decay_fraction",
                 "decay_shape", "min_lr"),
    "run": ("dir",),
}


@dataclass
class GridSpec:
    """An IsoFLOP grid: budgets, candidate widths and the rule turning a width into a run."""

    name: str = fld("custom", "label of the grid (written into the manifest)")
    budgets: list[float] = fld(help="training-FLOP budgets, one IsoFLOP curve each",
                               default_factory=lambda: [3e18, 6e18, 1e19, 3e19, 6e19, 1e20, 3e20])
    flops: str = fld("exact", "how a run's FLOPs are counted when placing it on its budget",
                     choices=FLOPS_MODES)
    widths: list[int] = fld(help="candidate model widths d (multiples of head_dim)",
                            default_factory=lambda: list(range(128, 2049, 128)))
    head_dim: int = fld(128, "channels per head; heads = kv heads = d / head_dim", ge=1)
    layer_base: float = fld(64.0, "a in L = round(d / (a + b*log2(d) - c))")
    layer_log2_coef: float = fld(4.0, "b in L = round(d / (a + b*log2(d) - c))")
    layer_offset: float = fld(7.0, "c in L = round(d / (a + b*log2(d) - c))")
    ffn_ratio: int = fld(4, "SwiGLU width as a multiple of d", ge=1)
    lr_constant: float = fld(0.33, "k in peak lr = k * sqrt(B) / d", gt=0)
    lr_max: float = fld(0.01, "cap on the peak learning rate", gt=0)
    adam_beta1: float = fld(0.95, "Adam beta1 of every run", ge=0, lt=1)
    beta2_base: float = fld(0.98, "beta2 = beta2_base ** (B / beta2_batch_ref)", gt=0, lt=1)
    beta2_batch_ref: float = fld(128.0, "batch size at which beta2 = beta2_base", gt=0)
    weight_decay: float = fld(0.1, "decoupled weight decay of every run", ge=0)
    z_loss: float = fld(0.0, "z-loss weight of every run (SODA's grid: none)", ge=0)
    warmup_fraction: float = fld(0.1, "WSD warmup fraction of the steps", ge=0, le=1)
    decay_fraction: float = fld(0.2, "WSD final linear decay fraction of the steps", ge=0, le=1)
    seq_length: int | None = fld(None, "training sequence length (none = the base config's)", ge=1)
    batch_size: int | None = fld(None, "global batch in sequences (none = the rule in the "
                                          "module docstring)", ge=1)
    target_steps: int = fld(65536, "batch rule: aim at between half this and this many steps", ge=1)
    min_batch_size: int = fld(8, "batch rule: smallest global batch", ge=1)
    micro_batch_size: int | None = fld(None, "sequences per micro-batch (none = the base config's, "
                                                "reduced to a divisor of the batch)", ge=1)
    min_tokens_per_param: float = fld(2.0, "drop a width whose D/N is below this", ge=0)
    max_tokens_per_param: float = fld(256.0, "drop a width whose D/N is above this", gt=0)
    flop_tolerance: float = fld(1e-3, "drop a run whose whole steps miss the budget by more "
                                      "than this fraction", gt=0)
    base_preset: str | None = fld(None, "config preset the runs start from (none = defaults: "
                                           "SODA vocabulary, seq 4096)")
    evals_per_run: int = fld(0, "validation passes per run, the last at the end "
                                "(0 = keep the base run.eval_interval)", ge=0)
    overrides: dict = fld(help="config values for every run, {section: {field: value}}",
                          default_factory=dict)

    def validate(self) -> GridSpec:
        validate_section("grid", self)
        # NOTE: the name is written into comment lines (run configs, sweep.sbatch): one plain word.
        try:
            plain_name(self.name, "grid.name")
        except UnsafeValueError as err:
            raise ConfigError(str(err)) from None
        if not self.budgets:
            raise ConfigError("grid.budgets: give at least one budget")
        bad = [b for b in self.budgets if not b > 0]
        if bad:
            raise ConfigError(f"grid.budgets: budgets must be > 0, got {bad}")
        if not self.widths:
            raise ConfigError("grid.widths: give at least one width")
        odd = [d for d in self.widths if d < self.head_dim or d % self.head_dim]
        if odd:
            raise ConfigError(f"grid.widths: {odd} are not positive multiples of grid.head_dim="
                              f"{self.head_dim} (heads = d / head_dim)")
        if self.min_tokens_per_param >= self.max_tokens_per_param:
            raise ConfigError("grid.max_tokens_per_param: must exceed grid.min_tokens_per_param")
        if self.warmup_fraction + self.decay_fraction > 1:
            raise ConfigError("grid.decay_fraction: warmup_fraction + decay_fraction must be <= 1")
        for width in self.widths:
            if self.layer_base + self.layer_log2_coef * math.log2(width) - self.layer_offset <= 0:
                raise ConfigError(f"grid.layer_base: the layer rule's denominator is <= 0 at d={width}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def grid_names() -> list[str]:
    """Names of the grids shipped in ``soda_mega/scaling/grids/``."""
    folder = resources.files(_GRID_PACKAGE).joinpath("grids")
    return sorted(p.name[:-len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_grid(name_or_path: str = "soda", changes: dict[str, Any] | None = None) -> GridSpec:
    """A shipped grid by name, or a YAML file, with field ``changes`` applied, validated."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text, source = path.read_text(encoding="utf-8"), str(path)
    elif name_or_path in grid_names():
        text = resources.files(_GRID_PACKAGE).joinpath("grids", f"{name_or_path}.yaml").read_text(encoding="utf-8")
        source = f"grid {name_or_path}"
    else:
        raise ConfigError(f"grid: {name_or_path!r} is neither a shipped grid ({', '.join(grid_names())}) "
                          "nor a YAML file")
    data = load_yaml(text, source) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of grid fields")
    names = [f.name for f in dataclasses.fields(GridSpec)]
    for key in list(data) + list(changes or {}):
        if key not in names:
            raise ConfigError(f"{source}: unknown grid field {short(key)}; fields are "
                              f"{', '.join(names)}")
    spec = GridSpec(**{**data, **(changes or {})})
    return spec.validate()


# ----------------------------------------------------------------------------- the rule
def layers_for_width(width: int, spec: GridSpec) -> int:
    """``L = round(d / (a + b*log2(d) - c))``, half rounding up, at least 1."""
    denominator = spec.layer_base + spec.layer_log2_coef * math.log2(width) - spec.layer_offset
    return max(1, math.floor(width / denominator + 0.5))


def model_for_width(width: int, spec: GridSpec, base: ModelConfig) -> ModelConfig:
    """The grid's model at width ``d``; fields the rule does not set come from ``base``."""
    heads = width // spec.head_dim
    return dataclasses.replace(
        base, hidden_size=width, num_layers=layers_for_width(width, spec), num_attention_heads=heads,
        num_kv_heads=heads, head_dim=spec.head_dim, ffn_hidden_size=spec.ffn_ratio * width)


def uncapped_lr(batch_size: int, width: int, spec: GridSpec) -> float:
    """``k * sqrt(B) / d`` before the cap."""
    return spec.lr_constant * math.sqrt(batch_size) / width


def peak_lr(batch_size: int, width: int, spec: GridSpec) -> float:
    """``min(k * sqrt(B) / d, lr_max)``."""
    return min(uncapped_lr(batch_size, width, spec), spec.lr_max)


def adam_beta2(batch_size: int, spec: GridSpec) -> float:
    """``beta2_base ** (B / beta2_batch_ref)``: 0.98 at B = 128, 0.98^2 at 256 ..."""
    return spec.beta2_base ** (batch_size / spec.beta2_batch_ref)


def choose_batch(tokens_target: float, width: int, seq_length: int, spec: GridSpec) -> int:
    """Global batch in sequences: ``spec.batch_size``, or the rule in the module docstring."""
    if spec.batch_size is not None:
        return spec.batch_size
    exact = tokens_target / (spec.target_steps * seq_length)
    batch = 2 ** math.ceil(math.log2(exact)) if exact > 1 else 1
    batch = max(batch, spec.min_batch_size)
    while batch // 2 >= spec.min_batch_size and uncapped_lr(batch, width, spec) > spec.lr_max:
        batch //= 2
    return batch


def budget_label(budget: float) -> str:
    """``3e18``, ``1.5e12``: a budget as it appears in run ids."""
    mantissa, exponent = f"{budget:.6e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


# ----------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class GridPlan:
    """Runs kept and candidates dropped, in budget then width order."""

    spec: GridSpec
    base: SodaConfig
    runs: list[tuple[ManifestRun, SodaConfig]]
    dropped: list[dict[str, Any]]


def base_config(spec: GridSpec, config_file: str | None = None, overrides: Iterable[str] = ()) -> SodaConfig:
    """The config every run starts from: preset or ``config_file`` < ``spec.overrides`` < CLI.

    ``config_file`` (with its own ``preset:`` key, if any) replaces ``spec.base_preset``. An
    override of a field the grid rule sets is refused, naming it.
    """
    overrides = list(overrides)
    parsed = parse_overrides(overrides)
    taken = [f"{s}.{k}" for s, keys in parsed.items() for k in keys if k in GRID_FIELDS.get(s, ())]
    if taken:
        raise ConfigError(f"{', '.join(taken)}: set by the grid rule for each run; change the grid "
                          "instead (--widths, --batch, a grid YAML), not the run config")
    cfg = load_config(config_file, None if config_file else spec.base_preset)
    mapping = copy.deepcopy(spec.overrides)
    if spec.seq_length is not None:
        mapping.setdefault("model", {})["seq_length"] = spec.seq_length
    apply_mapping(cfg, mapping, f"grid {spec.name} overrides")
    apply_mapping(cfg, parsed, "command line")
    return cfg.validate()


def _run_config(base: SodaConfig, spec: GridSpec, run_id: str, model: ModelConfig,
                plan: TokenPlan, lr: float, run_dir: str) -> SodaConfig:
    cfg = copy.deepcopy(base)
    cfg.model = dataclasses.replace(model, name=run_id)
    t = cfg.training
    t.global_batch_size = plan.batch_size
    t.micro_batch_size = math.gcd(plan.batch_size, spec.micro_batch_size or t.micro_batch_size)
    t.train_tokens = float(plan.tokens)
    t.lr = lr
    t.adam_beta1 = spec.adam_beta1
    t.adam_beta2 = adam_beta2(plan.batch_size, spec)
    t.weight_decay = spec.weight_decay
    t.z_loss = spec.z_loss
    t.lr_schedule, t.decay_shape, t.min_lr = "wsd", "linear", 0.0
    t.warmup_fraction, t.decay_fraction = spec.warmup_fraction, spec.decay_fraction
    cfg.run.dir = run_dir
    if spec.evals_per_run:
        cfg.run.eval_interval = max(1, math.ceil(plan.steps / spec.evals_per_run))
    return cfg.validate()


def plan_grid(spec: GridSpec, base: SodaConfig, run_root: str = "runs") -> GridPlan:
    """Apply the grid rule to every (budget, width); keep the runs that pass the filters."""
    layout = VocabLayout.from_config(base.vocab)
    runs: list[tuple[ManifestRun, SodaConfig]] = []
    dropped: list[dict[str, Any]] = []
    for budget in sorted(spec.budgets):
        for width in sorted(spec.widths):
            model = model_for_width(width, spec, base.model)
            counts = count_parameters(model, layout)
            n_params = counts.size_label_unpadded
            target = tokens_for_budget(model, layout, budget, spec.flops)
            batch = choose_batch(target, width, model.seq_length, spec)
            plan = plan_tokens(model, layout, budget, batch, spec.flops)
            ratio = plan.tokens / n_params
            reason = None
            if ratio < spec.min_tokens_per_param:
                reason = (f"D/N = {ratio:.3g} tokens per parameter < {spec.min_tokens_per_param:g} "
                          "(model too large for this budget)")
            elif ratio > spec.max_tokens_per_param:
                reason = (f"D/N = {ratio:.3g} tokens per parameter > {spec.max_tokens_per_param:g} "
                          "(model too small for this budget)")
            elif abs(plan.budget_error) > spec.flop_tolerance:
                reason = (f"{plan.steps} whole steps of {plan.tokens_per_step:,} tokens miss the budget "
                          f"by {plan.budget_error:+.2%} (tolerance {spec.flop_tolerance:.2%})")
            if reason:
                dropped.append({"budget": budget, "hidden_size": width, "num_layers": model.num_layers,
                                "n_params": n_params, "tokens_per_param": ratio, "reason": reason})
                continue
            run_id = f"{budget_label(budget)}-d{width}"
            run_dir = f"{run_root}/{run_id}"
            lr = peak_lr(batch, width, spec)
            cfg = _run_config(base, spec, run_id, model, plan, lr, run_dir)
            runs.append((ManifestRun(
                run_id=run_id, budget=float(budget), flops_mode=spec.flops, hidden_size=width,
                num_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
                num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                ffn_hidden_size=model.ffn_hidden_size, seq_length=model.seq_length, batch_size=batch,
                micro_batch_size=cfg.training.micro_batch_size, steps=plan.steps, tokens=plan.tokens,
                lr=lr, lr_uncapped=uncapped_lr(batch, width, spec), adam_beta1=spec.adam_beta1,
                adam_beta2=cfg.training.adam_beta2, weight_decay=spec.weight_decay, n_params=n_params,
                n_params_total=counts.total_unpadded, n_non_embedding=counts.non_embedding,
                tokens_per_param=ratio, flops_per_token_exact=plan.flops_per_token_exact,
                flops_per_token_6n=plan.flops_per_token_6n, flops_exact=plan.flops_exact,
                flops_6n=plan.flops_6n, budget_error=plan.budget_error,
                exact_over_6n=plan.exact_over_6n, config=f"configs/{run_id}.yaml", run_dir=run_dir,
            ), cfg))
    return GridPlan(spec=spec, base=base, runs=runs, dropped=dropped)


def write_grid(plan: GridPlan, out: str | Path, base_source: dict[str, Any]) -> Path:
    """One config YAML per run under ``out/configs/`` and ``out/manifest.json``; returns the manifest."""
    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for run, cfg in plan.runs:
        header = (f"# soda-mega scaling grid {plan.spec.name}: budget {run.budget:.3g} FLOPs "
                  f"({run.flops_mode}), d={run.hidden_size} L={run.num_layers}, N={run.n_params:,}, "
                  f"D={run.tokens:,} tokens, {run.steps} steps of {run.batch_size} x {run.seq_length}\n")
        (out / run.config).write_text(header + dump_config(cfg))
    layout = VocabLayout.from_config(plan.base.vocab)
    header = {"grid": plan.spec.to_dict(), "base": base_source, "vocab_size": layout.size,
              "seq_length": plan.base.model.seq_length, "base_model": dataclasses.asdict(plan.base.model)}
    return write_manifest(out / "manifest.json", header, [r for r, _ in plan.runs], plan.dropped)


def format_table(plan: GridPlan) -> str:
    """Per run: shape, N, D, batch, lr, and exact vs 6N FLOPs; then the dropped candidates."""
    lines = [f"IsoFLOP grid {plan.spec.name!r}: {len(plan.runs)} runs over {len(plan.spec.budgets)} "
             f"budgets, budgets counted {plan.spec.flops} "
             "(exact = full-attention matmul FLOPs x3; 6N = 6 x size label per token)",
             f"{'run':<14}{'L':>3}{'N (M)':>9}{'total (M)':>10}{'D (M tok)':>11}{'D/N':>7}{'B':>5}"
             f"{'steps':>8}{'lr':>9}{'beta2':>7}{'C exact':>10}{'C 6N':>10}{'6N vs exact':>12}"]
    for run, _ in plan.runs:
        lines.append(
            f"{run.run_id:<14}{run.num_layers:>3}{run.n_params / 1e6:>9.4g}{run.n_params_total / 1e6:>10.4g}"
            f"{run.tokens / 1e6:>11.5g}{run.tokens_per_param:>7.3g}{run.batch_size:>5}{run.steps:>8}"
            f"{run.lr:>9.2e}{run.adam_beta2:>7.3f}{run.flops_exact:>10.3e}{run.flops_6n:>10.3e}"
            f"{run.flops_6n / run.flops_exact - 1:>+12.1%}")
    per_budget: dict[float, int] = {}
    for run, _ in plan.runs:
        per_budget[run.budget] = per_budget.get(run.budget, 0) + 1
    lines.append("runs per budget: " + ", ".join(f"{budget_label(b)}: {n}" for b, n in per_budget.items()))
    if plan.runs:
        worst = max(abs(r.budget_error) for r, _ in plan.runs)
        lines.append(f"largest miss of the budget from whole steps: {worst:.4%}")
    if plan.dropped:
        lines.append(f"dropped {len(plan.dropped)} candidates:")
        lines += [f"  {budget_label(d['budget'])}-d{d['hidden_size']}: {d['reason']}" for d in plan.dropped]
    return "\n".join(lines)


def family_curve(spec: GridSpec, base_model: ModelConfig, vocab_size: int,
                 max_width: int = 32768) -> tuple[list[int], list[float], list[float]]:
    """``(widths, N, f_exact)`` of the grid rule's shapes at every multiple of the head dim.

    ``N`` is the size label, ``f_exact`` the exact training FLOPs per token (full attention).
    Used to place a compute-optimal model of this family at any budget.
    """
    widths, sizes, costs = [], [], []
    for width in range(spec.head_dim, max_width + 1, spec.head_dim):
        fpt = flops_per_token(model_for_width(width, spec, base_model), vocab_size)
        widths.append(width)
        sizes.append(fpt.six_n / 6)
        costs.append(fpt.training)
    return widths, sizes, costs
