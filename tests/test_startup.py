"""The command's start-up (soda_mega/utils/startup.py): torch is imported with the collector
paused and frozen, Triton (imported later, through Megatron-core) stays collectable so that its
nanobind module has nothing to report at exit, and in-process callers never freeze anything."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

from launch_env import clean_env

# Run in a fresh interpreter; reports at exit, after the command has run (atexit handlers run
# last-registered first, so this one runs after any the command registers).
_PROBE = textwrap.dedent("""
    import atexit, gc, sys

    def report():
        live = {id(o) for o in gc.get_objects()}  # generations 0-2: not the frozen objects
        frozen = [m for m in ("torch", "triton") if m in sys.modules and id(sys.modules[m]) not in live]
        print("frozen:", gc.get_freeze_count(), ",".join(frozen) or "-", file=sys.stderr)

    atexit.register(report)
    BODY
""")


def _probe(body: str) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE.replace("BODY", body)], capture_output=True,
                          text=True, env=clean_env(), timeout=300)
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("frozen:")]
    return proc.returncode, line, proc.stderr


def test_the_command_freezes_torch_and_leaves_triton_collectable():
    # `python -m soda_mega.cli model` (console_main), then what `train` imports besides torch
    code, line, stderr = _probe(textwrap.dedent("""
        import runpy
        sys.argv = ["soda-mega", "model", "--preset", "tiny"]
        try:
            runpy.run_module("soda_mega.cli", run_name="__main__")
        except SystemExit as stop:
            code = stop.code
        import soda_mega.training.trainer  # Megatron-core and Triton, after the freeze
        sys.exit(code)
    """))
    assert code == 0, stderr[-3000:]
    count, frozen = line.split()[1:]
    assert int(count) > 100_000 and frozen == "torch", line
    # Triton's nanobind module reports every object still alive at exit: none may be frozen.
    assert "leaked" not in stderr and "nanobind" not in stderr, stderr[-3000:]


def test_a_process_that_imported_torch_already_freezes_nothing():
    code, line, stderr = _probe(textwrap.dedent("""
        import torch
        sys.argv = ["soda-mega", "model", "--preset", "tiny"]
        from soda_mega.cli import console_main
        sys.exit(console_main())
    """))
    assert code == 0, stderr[-3000:]
    assert line.split()[1:] == ["0", "-"], line


def test_in_process_callers_never_freeze():
    from soda_mega.cli import main
    from soda_mega.utils.startup import import_torch_frozen

    before = gc.get_freeze_count()
    assert import_torch_frozen() is False  # torch is imported in this (pytest) process
    assert main(["model", "--preset", "tiny"]) == 0
    assert gc.get_freeze_count() == before
    assert gc.isenabled()
