"""Training throughput and MFU per preset, kernel variants and attention backends side by side
(issue 6). The measurement lives in :mod:`soda_mega.perf.throughput` so that the installed
``soda-mega bench throughput`` command runs the same code; this script is its entry point in
the repository::

    python benchmarks/bench_throughput.py            # GPU: every SODA preset that fits
    python benchmarks/bench_throughput.py --smoke    # CPU, < 60 s: shows that it works, no more

Writes ``benchmarks/results/bench_throughput_<device>[_smoke].{json,md,png}`` (stamped with
device, driver, versions and commit). ``--help`` lists the options.
"""

from __future__ import annotations

import sys

from soda_mega.perf.throughput import main

if __name__ == "__main__":
    sys.exit(main())
