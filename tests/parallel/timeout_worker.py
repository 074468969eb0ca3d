"""One rank of tests/parallel/test_timeouts.py: ``INIT_S COLLECTIVE_S`` in argv; rank 0 runs
one all-reduce, rank 1 never does (it sleeps until killed). Prints what happened and when."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from soda_mega.parallel.state import init_distributed

start = time.monotonic()
try:
    init_distributed("gloo", init_timeout_s=float(sys.argv[1]),
                     collective_timeout_s=float(sys.argv[2]))
except Exception as err:  # noqa: BLE001 - the test reads the message
    print(f"init failed after {time.monotonic() - start:.1f} s: {type(err).__name__}: {err}",
          flush=True)
    sys.exit(7)
print("init ok", flush=True)
if os.environ["RANK"] != "0":
    time.sleep(600)
start = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except Exception as err:  # noqa: BLE001
    print(f"all_reduce failed after {time.monotonic() - start:.1f} s: {err}", flush=True)
    os._exit(8)  # NOTE: gloo aborts in its destructor with a collective still pending
print("all_reduce ok", flush=True)
