"""Process start-up: import torch with the cyclic garbage collector paused, then freeze it.

``import torch`` creates about 250,000 objects (modules, classes, functions, operator
schemas) that live as long as the process. Python's cyclic garbage collector walks all of them
again at every full collection: a few times while the imports that follow run, at each
explicit ``gc.collect()`` (Megatron-core calls one per checkpoint save) and once more, the
slowest walk of all, when the interpreter shuts down. ``gc.freeze()`` moves the objects alive
at that moment to a generation that collections never walk. Measured on the 2-core CPU
machine: ``import soda_mega.training.trainer`` (torch, Megatron-core, Triton) plus interpreter
exit, 2.4-2.5 s of CPU -> 1.8 s; a 6-step ``soda-mega train --preset tiny``, 7.2 s -> 6.2 s.

Only torch is frozen, not what is imported after it: Triton's compiled module (nanobind)
counts the objects still alive when the interpreter ends and prints a leak report for each
one; frozen objects are never freed, so Triton's must stay collectable.

For a process's entry point only (the ``soda-mega`` command, benchmark scripts): what is alive
at the freeze is never collected, so a library function must never call this.
"""

from __future__ import annotations

import gc
import sys


def import_torch_frozen() -> bool:
    """Import torch with the collector paused, then freeze every object alive. Does nothing
    when torch is imported already (the caller is not a process's start). True if it froze."""
    if "torch" in sys.modules:
        return False
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        # NOTE: no gc.collect() first: the import leaves ~7,000 unreachable objects (torch
        # 2.13), cheaper to keep for good than one more full walk of everything.
        gc.freeze()
        if enabled:
            gc.enable()
    return True
