"""A pytest plugin for tests/test_suite_workers.py: each pytest-xdist worker appends
"<worker> <test id>" to the file ``SODA_WORKER_LOG`` names as each of its tests ends."""

from __future__ import annotations

import os


def pytest_runtest_logfinish(nodeid, location):
    path, worker = os.environ.get("SODA_WORKER_LOG"), os.environ.get("PYTEST_XDIST_WORKER")
    if path and worker:  # not the controller, which hears of every test too
        with open(path, "a") as f:
            f.write(f"{worker} {nodeid}\n")
