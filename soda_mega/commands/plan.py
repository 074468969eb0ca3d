"""``soda-mega plan``: the layouts of a run that fit memory, ranked by predicted step time.

For a preset or config on ``--gpus`` GPUs of kind ``--gpu``: every layout (TP / PP / virtual
stages / DP, micro-batch, recompute, sequence parallelism) whose memory plan fits, with its
predicted step time, tokens/s per GPU, MFU against the datasheet peak, peak memory, and the
days and GPU-hours of the token budget; the best one as a ready override line. The step-time
model is :mod:`soda_mega.planning.steptime` (``--explain`` itemises the best layout and lists
every constant with its source). Predictions, not measurements: see the README's "Planning a
run" section for how far they are from published runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from soda_mega.commands.show_config import add_config_arguments


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="rank the layouts that fit by predicted step time, with cost",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--gpu", default="h100-sxm",
                   help="GPU kind: h100-sxm, h100-pcie, h100-nvl, h200, a100 (default h100-sxm)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the run (default 8)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--tokens", type=float, default=None,
                   help="token budget (default training.train_tokens)")
    p.add_argument("--top", type=int, default=10, help="rows to print (0 = all; default 10)")
    p.add_argument("--json", action="store_true", help="print every row as JSON")
    p.add_argument("--explain", action="store_true",
                   help="itemise the best layout's step and list the model's constants")
    p.add_argument("--no-calibration", action="store_true",
                   help="ignore benchmarks/results/gpu_*.json (use the assumed constants)")
    return p


def _fail(message: str) -> int:
    print(f"soda-mega: plan: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    from soda_mega.config import load_config
    from soda_mega.planning.calibrate import calibration_for
    from soda_mega.planning.constants import constant_table
    from soda_mega.planning.hardware import gpu_spec
    from soda_mega.planning.search import rank_layouts, stack_of
    from soda_mega.planning.steptime import format_parts

    cfg = load_config(args.config, args.preset, args.overrides)
    try:
        gpu = gpu_spec(args.gpu)
    except ValueError as err:
        return _fail(str(err))
    if args.gpus < 1 or args.gpus_per_node < 1:
        return _fail(f"--gpus and --gpus-per-node must be >= 1 (got {args.gpus}, {args.gpus_per_node})")
    tokens = args.tokens if args.tokens is not None else cfg.training.train_tokens
    if tokens <= 0:
        return _fail(f"--tokens must be > 0 (got {tokens:g})")
    cal = calibration_for(gpu, None if args.no_calibration else "default")
    ranked = rank_layouts(cfg, args.gpus, cal.gpu, args.gpus_per_node, cal.eff)
    if not ranked:
        return _fail(f"no layout of {cfg.model.name} fits {gpu.memory_gib:g} GiB on {args.gpus} "
                     f"{gpu.name} GPUs with global batch {cfg.training.global_batch_size} "
                     "(try more GPUs or another --training.global_batch_size)")
    rows = [c.row(tokens) for c in ranked]
    best = ranked[0]
    if args.json:
        print(json.dumps({"model": cfg.model.name, "gpu": gpu.name, "gpus": args.gpus,
                          "gpus_per_node": args.gpus_per_node, "tokens": tokens,
                          "stack": stack_of(cfg).name, "measured": cal.measured,
                          "assumed": cal.assumed, "rows": rows,
                          "best": {**rows[0], "parts_s": best.time.parts}}, indent=1))
        return 0
    shown = rows if args.top == 0 else rows[:args.top]
    print(f"{cfg.model.name} on {args.gpus} x {gpu.name} ({args.gpus_per_node} per node), "
          f"{tokens:.3g} tokens, global batch {cfg.training.global_batch_size}: "
          f"{len(rows)} layouts fit; predicted with {stack_of(cfg).name}")
    head = (f"{'#':>3} {'layout':<20}{'mb':>3} {'recompute':<10}{'SP':<4}{'step s':>8}"
            f"{'tok/s/GPU':>11}{'MFU':>6}{'mem GiB':>9}{'days':>8}{'GPU-hours':>12}")
    print(head)
    print("-" * len(head))
    for i, r in enumerate(shown, 1):
        print(f"{i:>3} {r['layout']:<20}{r['micro_batch']:>3} {r['recompute']:<10}"
              f"{'yes' if r['sequence_parallel'] else 'no':<4}{r['step_s']:>8.3f}"
              f"{r['tokens_per_s_per_gpu']:>11,.0f}{r['mfu']:>6.0%}{r['memory_gib']:>9.1f}"
              f"{r['days']:>8.1f}{r['gpu_hours']:>12,.0f}")
    if len(shown) < len(rows):
        print(f"    ... {len(rows) - len(shown)} more (--top 0 for all)")
    print(f"\nbest: {best.overrides()}")
    measured = ", ".join(f"{k} from {v['source']}" for k, v in cal.measured.items())
    print("constants: " + (f"measured: {measured}; the rest assumed" if measured else
                           "all assumed (no GPU campaign result for this GPU yet)"))
    if args.explain:
        print(f"\n# predicted step of the best layout ({best.layout.label()}, micro-batch "
              f"{best.layout.micro_batch}, {best.layout.micro_batches} micro-batches per replica)")
        print("\n".join(format_parts(best.time)))
        print("\n# constants (name, value, source)")
        for name, value in (("gemm_large", cal.gpu.gemm_large), ("hbm_efficiency", cal.gpu.hbm_efficiency),
                            ("link_efficiency", cal.gpu.link_efficiency)):
            src = cal.measured.get(name, {}).get("source") or "assumed (soda_mega/planning/hardware.py)"
            print(f"  {name:<28}{value:>10.4g}  {src}")
        for name, value, source in constant_table(cal.eff):
            src = cal.measured.get(name, {}).get("source") or source
            print(f"  {name:<28}{value:>10.4g}  {src}")
    return 0
