"""The ``soda-mega`` command: one sub-command per module in :mod:`soda_mega.commands`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings

from soda_mega.config.fields import ConfigError
from soda_mega.errors import (
    EXIT_FAILURE,
    EXIT_USER_ERROR,
    SodaUserError,
    forget_outcome,
    note_outcome,
    record_error,
    under_torchrun,
    write_status,
)
from soda_mega.utils import stop_signals
from soda_mega.utils.startup import import_torch_frozen
from soda_mega.utils.terminal import printable

# sub-command name -> module in soda_mega.commands; each module has
# ``register(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
COMMANDS = {
    "model": "soda_mega.commands.model_info",
    "config": "soda_mega.commands.show_config",
    "train": "soda_mega.commands.train",
    "data": "soda_mega.commands.data",
    "bench": "soda_mega.commands.bench",
    "plan": "soda_mega.commands.plan",
    "profile": "soda_mega.commands.profile",
    "scaling": "soda_mega.commands.scaling",
    "eval": "soda_mega.commands.evaluate",
    "translate": "soda_mega.commands.translate",
    "export": "soda_mega.commands.export",
    "import": "soda_mega.commands.import_hf",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soda-mega",
        description="Train and study SODA-style audio-text foundation models on Megatron-core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in COMMANDS.values():
        module = importlib.import_module(module_name)
        sp = module.register(sub)
        sp.set_defaults(_run=module.run)
    return parser


def _quiet_library_warnings() -> None:
    # Megatron-core announces at import that Transformer Engine / apex are absent; soda-mega has
    # its own fallbacks for both, so these lines are noise on every run.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|apex).*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def console_main() -> int:
    """The ``soda-mega`` command (and ``python -m soda_mega.cli``): :func:`main` in a process of
    its own, so torch is imported frozen first (soda_mega.utils.startup: ~1 s less CPU per
    training process). Tests and other in-process callers use :func:`main`."""
    stop_signals.hold()  # first, as in main(): torch's import is the slowest part of start-up
    import_torch_frozen()
    code = main()
    if stop_signals.was_answered():
        # The trainer has answered the stop signals: one now (torchrun stopping the workers
        # still running once one has left) must not turn the exit code into a death by signal.
        stop_signals.ignore()
    return code


def main(argv: list[str] | None = None) -> int:
    # First: a SIGUSR1 / SIGTERM during the imports below is recorded, not fatal. A command
    # with HANDLES_STOP_SIGNALS (`train`) acts on it once its own handler is in place; for any
    # other it is raised again as soon as the imports are done.
    stop_signals.hold()
    try:
        return _main(argv)
    finally:
        stop_signals.release()


def _main(argv: list[str] | None) -> int:
    _quiet_library_warnings()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.overrides = [a for a in extra]
    bad = [a for a in extra if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a)]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --section.key=value)")
    if not getattr(sys.modules[args._run.__module__], "HANDLES_STOP_SIGNALS", False):
        stop_signals.release()  # imports done: the command's own work keeps the usual meaning
    code = EXIT_FAILURE  # an exception that escapes below (traceback printed by Python)
    forget_outcome()
    try:
        code = _run_command(args)
    except Exception as err:
        # Under torchrun, the launcher's summary names this rank and the error (its traceback
        # stays on stderr, printed by Python as the exception leaves).
        record_error(f"{type(err).__name__}: {_cut(err, 500)}", traceback.format_exc())
        raise
    finally:
        write_status(code)
    return code


def _run_command(args) -> int:
    try:
        return int(args._run(args) or 0)
    except ConfigError as err:
        return _user_error(f"configuration error: {_cut(err)}")
    except SodaUserError as err:
        # Bad inputs (a missing file, a checkpoint of another model, a broken manifest): the
        # message names the problem; a traceback would only hide it.
        return _user_error(f"error: {_cut(err)}")


def _user_error(text: str) -> int:
    """Say ``text`` once per node and exit 2.

    NOTE: under torchrun every process of a node meets the same configuration error; only local
    rank 0 prints it, the others record it in their torchrun error file, and the launcher
    prints those that differ from local rank 0's (soda_mega.parallel.torchrun)."""
    note_outcome(message=text)
    record_error(text)
    if not under_torchrun() or os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"soda-mega: {text}", file=sys.stderr)
    return EXIT_USER_ERROR


def _cut(err: BaseException, limit: int = 4000) -> str:
    """The message on one line, cut short: the last guard against a message that quotes a huge
    input, or one holding newlines or terminal escapes (a file's strings, escaped)."""
    # NOTE: a message that lists several problems, one a line (``lists_lines``: an eval
    # manifest's bad items), keeps its line breaks; everything else within a line is escaped.
    lines = str(err).split("\n") if getattr(err, "lists_lines", False) else [str(err)]
    text = "\n".join(printable(line) for line in lines)
    if len(text) <= limit:
        return text
    return f"{text[:limit]} [... {len(text) - limit:,} more characters]"


if __name__ == "__main__":
    sys.exit(console_main())
