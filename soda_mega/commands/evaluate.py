"""``soda-mega eval TASK``: evaluation of a checkpoint (SODA_SPEC section 5).

Each task is a module with ``register(tasks) -> argparse.ArgumentParser`` (adding its own
parser to ``tasks``) and ``run(args) -> int``; :data:`TASKS` lists them in ``--help`` order.
A module holding several tasks is named ``module:name`` and has ``register_<name>`` and
``run_<name>``.
"""

from __future__ import annotations

import importlib

TASKS: dict[str, str] = {
    "nll": "soda_mega.commands.eval_nll",
    "pairs": "soda_mega.commands.eval_pairs",
    "asr": "soda_mega.commands.eval_speech:asr",
    "tts": "soda_mega.commands.eval_speech:tts",
    "speech": "soda_mega.commands.eval_speech:speech",
    "make-tasks": "soda_mega.commands.eval_speech:make_tasks",
}


def register(subparsers):
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: held-out NLL, likelihood pairs, ASR, TTS",
        description="Evaluate a soda-mega checkpoint (a step_N folder, a checkpoints/ folder or a "
                    "run folder; any TP/PP layout). `soda-mega eval TASK --help` explains each task.")
    tasks = p.add_subparsers(dest="eval_task", metavar="TASK")
    tasks.required = True
    for spec in TASKS.values():
        module_name, _, name = spec.partition(":")
        module = importlib.import_module(module_name)
        reg, run_ = (getattr(module, f"register_{name}"), getattr(module, f"run_{name}")) if name \
            else (module.register, module.run)
        reg(tasks).set_defaults(_eval_run=run_)
    return p


def run(args) -> int:
    return int(args._eval_run(args) or 0)
