"""torchrun worker: ``soda-mega eval nll`` in several parallel layouts within the same processes.

Usage: ``torchrun --nproc-per-node 2 nll_layouts_worker.py OUT_DIR NAME=ARGS... -- COMMON_ARGS...``
where each ``NAME=ARGS`` is a layout name and its space-separated extra arguments; the report of
each layout is written to ``OUT_DIR/NAME.json`` by the CLI itself (``--out``). One process group
serves every layout (the CLI keeps a group it did not create), which saves a torchrun start-up
per layout.
"""

from __future__ import annotations

import sys

from soda_mega.utils.startup import import_torch_frozen

import_torch_frozen()  # a process of its own (a no-op where a test module imports this one)
import torch.distributed as dist  # noqa: E402

from soda_mega.cli import main  # noqa: E402
from soda_mega.parallel.state import init_distributed  # noqa: E402


def run() -> int:
    out_dir, rest = sys.argv[1], sys.argv[2:]
    split = rest.index("--")
    layouts, common = rest[:split], rest[split + 1:]
    init_distributed()
    try:
        for spec in layouts:
            name, _, extra = spec.partition("=")
            argv = [*common, *extra.split(), "--quiet", "--out", f"{out_dir}/{name}.json"]
            rc = main(argv)
            if rc != 0:
                print(f"layout {name}: exit status {rc}", file=sys.stderr)
                return rc
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run())
