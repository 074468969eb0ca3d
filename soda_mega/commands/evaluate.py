"""``soda-mega eval TASK``: evaluation of a checkpoint (SODA_SPEC section 5).

Each task is a module with ``register(tasks) -> argparse.ArgumentParser`` (adding its own
parser to ``tasks``) and ``run(args) -> int``; :data:`TASKS` lists them in ``--help`` order.
"""

from __future__ import annotations

import importlib

TASKS: dict[str, str] = {
}


def register(subparsers):
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: held-out NLL, likelihood pairs, ASR, TTS",
        description="Evaluate a soda-mega checkpoint (a step_N folder, a checkpoints/ folder or a "
                    "run folder; any TP/PP layout). `soda-mega eval TASK --help` explains each task.")
    tasks = p.add_subparsers(dest="eval_task", metavar="TASK")
    tasks.required = True
    for name, module_name in TASKS.items():
        module = importlib.import_module(module_name)
        module.register(tasks).set_defaults(_eval_run=module.run)
    return p


def run(args) -> int:
    return int(args._eval_run(args) or 0)
