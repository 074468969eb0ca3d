"""``soda-mega train``: pretrain a SODA model (one process, or one per GPU under torchrun)."""

from __future__ import annotations

import argparse
import os
import sys

from soda_mega.commands.show_config import add_config_arguments
from soda_mega.config import load_config
from soda_mega.config.fields import ConfigError
from soda_mega.errors import EXIT_DIVERGED, EXIT_PREEMPTED, note_outcome
from soda_mega.run.resolved import resolve_run
from soda_mega.utils import stop_signals

# SIGUSR1 / SIGTERM that arrive while soda-mega starts are kept for this command's own handler
# (soda_mega.utils.stop_signals): it finishes the step, saves and exits 4.
HANDLES_STOP_SIGNALS = True


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
        epilog=(
            "exit codes: 0 finished; 1 unexpected error (traceback); 2 bad configuration or input "
            "(one line naming the field, file or value); 3 diverged (run.max_bad_steps); 4 stopped "
            "by SIGUSR1 / SIGTERM after finishing the step and saving it (rerun to resume); 5 the "
            "watchdog: a step took longer than run.step_timeout_s (Python stacks of every rank in "
            "run.dir/stacks/)."),
    )
    add_config_arguments(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, parallel layout and memory estimate, open and "
                        "check the datasets of data.train / data.valid, then exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="GPUs for --dry-run (default: WORLD_SIZE or 1)")
    return p


def run(args) -> int:
    cfg = load_config(args.config, args.preset, args.overrides)
    world = (args.world_size if args.dry_run and args.world_size
             else int(os.environ.get("WORLD_SIZE", "1")))
    # The run's vocabulary, padded vocabulary and batch geometry, once (checks the layout).
    resolved = resolve_run(cfg, world)
    if args.dry_run:
        from soda_mega.training.plan import describe_data, describe_run

        try:
            print(describe_run(cfg, world, resolved))
        except ValueError as err:
            print(f"soda-mega: impossible layout: {err}", file=sys.stderr)
            return 2
        from soda_mega.planning.search import rank_line

        print(f"\n# layout rank (`soda-mega plan --gpus {world}` ranks them all)",
              rank_line(cfg, world, vocab=resolved.vocab), sep="\n")
        # A dataset that cannot be used fails here as in the run (exit 2, one line naming it).
        data = describe_data(cfg, resolved.vocab)
        print("\n# data (opened and checked as the run will open them)", *data, sep="\n")
        return 0
    if not cfg.data.train:
        raise ConfigError("data.train: no datasets given; set --data.train=DIR[,DIR...] to folders "
                          "built by `soda-mega data build` or `soda-mega data demo`")
    if int(os.environ.get("RANK", "0")) == 0:
        from soda_mega.training.plan import start_line

        print(start_line(cfg, resolved), flush=True)
    from soda_mega.parallel.state import leave_together
    from soda_mega.training.preemption import PreemptionFlag, TrainingPreempted
    from soda_mega.training.trainer import Trainer, TrainingDiverged

    # Installed before anything is built: a SIGUSR1 / SIGTERM during set-up stops the run
    # cleanly (exit 4, the launcher requeues it) instead of killing the process.
    preemption = PreemptionFlag().install()
    try:
        trainer = Trainer(cfg, resolved)
        trainer.run(preemption)
        code = 0
    except TrainingDiverged as err:
        print(f"soda-mega: training stopped: {err}", file=sys.stderr)
        code = EXIT_DIVERGED
    except TrainingPreempted as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"soda-mega: preempted: {err} (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        code = EXIT_PREEMPTED
    finally:
        preemption.restore()
    # The launchers end with one line from the status file ("finished: step N", ...).
    note_outcome(step=trainer.step)
    stop_signals.answered()  # the exit code says how the run ended; a later signal changes nothing
    leave_together()
    return code
