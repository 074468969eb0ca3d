"""Environment for the subprocesses tests launch (the CLI, torchrun workers)."""

from __future__ import annotations

import os

# torch.distributed variables a parent process may have set; a child must not inherit them
# (it would try to join the parent's rendezvous).
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict:
    """This process's environment without torch.distributed variables, one OpenMP thread per
    process (two gloo ranks share the 2 cores of CI) and library warnings off."""
    # PYTEST_XDIST_*: a pytest a test starts is no pytest-xdist worker, whatever this one is.
    env = {k: v for k, v in os.environ.items()
           if k not in _DIST_VARS and not k.startswith("PYTEST_XDIST_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env
