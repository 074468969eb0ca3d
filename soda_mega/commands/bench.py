"""``soda-mega bench``: throughput / MFU, the memory plan of every preset, and run cost.

* ``bench throughput``: :mod:`soda_mega.perf.throughput` (same options as
  ``benchmarks/bench_throughput.py``); ``--section.key=value`` overrides apply to every case.
* ``bench memory``: the predicted per-GPU memory (:mod:`soda_mega.training.plan`) of each
  preset or config file under the given layout / micro-batch / recompute / loss settings.
* ``bench cost``: GPU-hours and days of SODA's runs from a measured throughput
  (:mod:`soda_mega.perf.cost`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="throughput / MFU benchmark, memory plan, cost projection",
                       description=__doc__.split("\n\n")[0])
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    bsub.required = True

    from soda_mega.perf import throughput

    t = bsub.add_parser("throughput", help="tokens/s, TFLOP/s and MFU per preset and kernel variant",
                        description=throughput.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    throughput.add_arguments(t)

    m = bsub.add_parser("memory", help="predicted per-GPU memory of every preset",
                        description="Predicted per-GPU peak memory (allocated, and the device total "
                                    "with the CUDA context and allocator slack) for each preset or "
                                    "config file under the given settings. Formulas: "
                                    "soda_mega/training/plan.py.")
    m.add_argument("--preset", action="append", metavar="NAME",
                   help="preset to plan (repeatable; default: the four SODA presets)")
    m.add_argument("--config", action="append", metavar="FILE", type=Path,
                   help="config file to plan (repeatable), e.g. launchers/configs/*.yaml")
    m.add_argument("--world-size", type=int, default=8, help="GPUs (default 8)")
    m.add_argument("--tp", type=int, help="tensor-parallel size")
    m.add_argument("--pp", type=int, help="pipeline stages")
    m.add_argument("--vp", type=int, help="virtual pipeline chunks per stage (interleaved 1F1B)")
    m.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None,
                   help="sequence parallelism")
    m.add_argument("--micro-batch", type=int, help="micro-batch size")
    m.add_argument("--global-batch", type=int, help="global batch size")
    m.add_argument("--recompute", choices=("none", "selective", "full"))
    m.add_argument("--loss", choices=("auto", "triton", "torch", "megatron"), help="kernels.loss")
    m.add_argument("--target", choices=("cuda", "cpu"), default="cuda",
                   help="code paths to plan for (default cuda)")
    m.add_argument("--gpu-memory-gib", type=float, default=80.0,
                   help="memory per GPU for the fits column (default 80, an H100 80GB)")
    m.add_argument("--detail", action="store_true", help="also print each row's itemised plan")
    m.add_argument("--json", action="store_true", help="print the plans as JSON")

    c = bsub.add_parser("cost", help="GPU-hours and days of SODA's runs from a measured throughput",
                        description=__import__("soda_mega.perf.cost", fromlist=["x"]).__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--results", type=Path, help="bench_throughput_*.json to read tokens/s from")
    c.add_argument("--tokens-per-s-per-gpu", type=float, help="a measured rate, for --for-preset")
    c.add_argument("--for-preset", help="the preset --tokens-per-s-per-gpu was measured on")
    c.add_argument("--tflops-per-gpu", type=float,
                   help="project every unmeasured preset at this model TFLOP/s per GPU")
    c.add_argument("--gpus", type=int, default=64, help="cluster size (default 64)")
    c.add_argument("--tokens", type=float, default=500e9, help="training tokens (default 500e9)")
    c.add_argument("--json", action="store_true")
    return p


def run(args) -> int:
    return {"throughput": _throughput, "memory": _memory, "cost": _cost}[args.bench_command](args)


def _throughput(args) -> int:
    from soda_mega.perf import throughput

    return throughput.run(args, list(args.overrides))


def _settings(args) -> list[str]:
    out = list(args.overrides)
    for flag, key in (("tp", "parallel.tensor_parallel"), ("pp", "parallel.pipeline_parallel"),
                      ("vp", "parallel.virtual_pipeline"), ("sp", "parallel.sequence_parallel"),
                      ("micro_batch", "training.micro_batch_size"),
                      ("global_batch", "training.global_batch_size"),
                      ("recompute", "training.recompute"), ("loss", "kernels.loss")):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"--{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def _memory(args) -> int:
    from soda_mega.config import load_config
    from soda_mega.training.plan import GIB, MemoryAssumptions, format_plan, plan_memory

    sources = [(c.name, c, None) for c in args.config or []]
    presets = args.preset or ([] if sources else ["soda-135m", "soda-600m", "soda-1.7b", "soda-4b"])
    sources += [(p, None, p) for p in presets]
    rows, plans = [], []
    for label, path, preset in sources:
        cfg = load_config(path, preset, _settings(args))
        try:
            plan = plan_memory(cfg, args.world_size, MemoryAssumptions(target=args.target))
        except ValueError as err:
            print(f"soda-mega: {label}: impossible layout: {err}", file=sys.stderr)
            return 2
        rows.append((label, cfg, plan))
        plans.append({"source": label, "model": cfg.model.name, "plan": plan.to_dict()})
    if args.json:
        print(json.dumps(plans, indent=1, default=str))
        return 0
    print(f"predicted memory per GPU, {args.world_size} GPUs, {args.target} code paths "
          f"(GiB; allocated = torch.cuda.max_memory_allocated, total adds context + allocator slack)")
    head = (f"{'source':<28}{'layout':<22}{'mb':>4} {'recompute':<10}{'loss':<9}{'static':>8}"
            f"{'activ.':>8}{'loss+ws':>9}{'alloc':>8}{'total':>8}  fits {args.gpu_memory_gib:g} GiB")
    print(head)
    print("-" * len(head))
    for label, cfg, plan in rows:
        p, w = cfg.parallel, plan.worst
        layout = f"TP{p.tensor_parallel} PP{p.pipeline_parallel} DP{plan.data_parallel}" \
                 + (f" VP{p.virtual_pipeline}" if p.virtual_pipeline else "") \
                 + (" SP" if p.sequence_parallel else "")
        fits = "yes" if plan.device_total <= args.gpu_memory_gib * GIB else "NO"
        print(f"{label[-28:]:<28}{layout:<22}{cfg.training.micro_batch_size:>4} "
              f"{cfg.training.recompute:<10}{plan.loss_impl:<9}{w.static / GIB:>8.2f}"
              f"{(w.activations + w.pipeline_buffers) / GIB:>8.2f}"
              f"{(w.loss_held + w.working_set) / GIB:>9.2f}{plan.allocated_peak / GIB:>8.2f}"
              f"{plan.device_total / GIB:>8.2f}  {fits}")
    if args.detail:
        for label, _, plan in rows:
            print(f"\n# {label} (stage {plan.worst.stage})")
            print("\n".join(format_plan(plan, args.gpu_memory_gib)))
    return 0


def _cost(args) -> int:
    from soda_mega.perf.cost import SMOKE_BANNER, format_projection, project, read_results

    try:
        results = read_results(args.results) if args.results else None
        proj = project(args.gpus, args.tokens, results, args.tokens_per_s_per_gpu, args.for_preset,
                       args.tflops_per_gpu)
    except (ValueError, OSError) as err:
        print(f"soda-mega: bench cost: {err}", file=sys.stderr)
        return 2
    if proj["meaningless_for_gpu_planning"]:
        print(SMOKE_BANNER, file=sys.stderr)
    print(json.dumps(proj, indent=1) if args.json else format_projection(proj))
    return 0
