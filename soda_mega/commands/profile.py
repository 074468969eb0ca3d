"""``soda-mega profile``: a torch.profiler trace of N training steps and where their time goes.

Builds the run of ``--preset`` / ``--config`` (+ overrides) exactly as ``soda-mega train``
would, on a synthetic corpus when ``data.train`` is empty, runs ``--warmup`` untimed steps and
records ``--steps`` steps into a Chrome / Perfetto trace, then prints the share of time in
matmuls, attention, loss, embedding, norms, optimizer, communication, other and idle (rules:
:mod:`soda_mega.perf.profiling`). ``--analyze TRACE`` only re-reads a saved trace.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from soda_mega.commands.show_config import add_config_arguments


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("profile", help="profile N training steps: Chrome trace + time breakdown",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--accum", type=int,
                   help="micro-batches per step per GPU (sets training.global_batch_size; default: "
                        "the config's, which for SODA runs on one GPU is 512/micro-batch)")
    p.add_argument("--out", type=Path, default=Path("trace.json"),
                   help="trace file (default trace.json; under torchrun each rank adds .rankN)")
    p.add_argument("--analyze", type=Path, metavar="TRACE", help="only classify a saved trace")
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    return p


def _print(result: dict, as_json: bool) -> None:
    from soda_mega.perf.profiling import format_breakdown

    print(json.dumps(result, indent=1) if as_json else format_breakdown(result))


def run(args) -> int:
    from soda_mega.perf.profiling import breakdown

    if args.analyze:
        try:
            _print(breakdown(args.analyze), args.json)
        except (OSError, ValueError) as err:
            print(f"soda-mega: profile: {err}", file=sys.stderr)
            return 2
        return 0
    if args.steps < 1 or args.warmup < 0:
        print("soda-mega: profile: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from soda_mega.config import load_config
    from soda_mega.parallel import state
    from soda_mega.perf import harness
    from soda_mega.perf.profiling import record_trace

    cfg = load_config(args.config, args.preset, args.overrides)
    state.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    extra = []
    if args.accum:
        dp = world // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
        extra.append(f"--training.global_batch_size={cfg.training.micro_batch_size * args.accum * dp}")
    out = args.out if world == 1 else args.out.with_name(f"{args.out.stem}.rank{rank}{args.out.suffix}")
    with tempfile.TemporaryDirectory(prefix="soda-profile-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = harness.with_overrides(cfg, extra)
        data = [] if cfg.data.train else harness.synthetic_corpus(
            tmp / "corpus", cfg,
            min_tokens=max(200_000, 4 * cfg.training.global_batch_size * (cfg.model.seq_length + 1)))
        if not cfg.data.train and rank == 0:
            print("soda-mega: profile: data.train is empty: using a synthetic corpus", file=sys.stderr)
        cfg = harness.measurement_config(cfg, tmp / "run", data)
        trainer = harness.build_trainer(cfg)
        try:
            batches = harness.fetch_steps(trainer, min(args.steps + args.warmup, 4))
            record_trace(trainer, batches, args.steps, args.warmup, out)
        finally:
            harness.release(trainer)
    result = breakdown(out)
    result["trace"] = str(out)
    summary = out.with_name(out.stem + ".breakdown.json")
    summary.write_text(json.dumps(result, indent=1))
    if rank == 0:
        print(f"wrote {out} (open in https://ui.perfetto.dev) and {summary}")
        _print(result, args.json)
    return 0
