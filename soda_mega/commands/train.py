"""``soda-mega train``: pretrain a SODA model (one process, or one per GPU under torchrun)."""

from __future__ import annotations

import argparse
import os
import sys

from soda_mega.commands.show_config import add_config_arguments
from soda_mega.config import load_config


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="pretrain a model (plain process, torchrun or the launchers/ scripts)",
        description=(
            "Train on the datasets of data.train with the model of --preset / --config and any "
            "--section.key=value overrides (see `soda-mega config --fields`). Resumes from the "
            "newest intact checkpoint in run.dir (falling back past damaged ones); "
            "--run.resume=false --run.overwrite=true starts over there, moving the old "
            "checkpoints to run.dir/replaced/. Under torchrun every process "
            "runs this same command; the TP/PP sizes come from the parallel section and data "
            "parallelism takes the remaining ranks."),
    )
    add_config_arguments(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, parallel layout and memory estimate, then exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="GPUs for --dry-run (default: WORLD_SIZE or 1)")
    return p


def run(args) -> int:
    cfg = load_config(args.config, args.preset, args.overrides)
    if args.dry_run:
        from soda_mega.training.plan import describe_run

        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        try:
            print(describe_run(cfg, world))
        except ValueError as err:
            print(f"soda-mega: impossible layout: {err}", file=sys.stderr)
            return 2
        return 0
    from soda_mega.training.trainer import Trainer, TrainingDiverged

    try:
        Trainer(cfg).run()
    except TrainingDiverged as err:
        print(f"soda-mega: training stopped: {err}", file=sys.stderr)
        return 3
    return 0
