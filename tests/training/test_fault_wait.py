"""The ``wait`` fault (soda_mega/training/faults.py): a step held open until a stop signal
arrives, which then still reaches the handler that was installed."""

from __future__ import annotations

import os
import signal
import threading
import time

from soda_mega.training import faults


def test_wait_ends_on_the_signal_and_passes_it_on(monkeypatch):
    seen = []

    def handler(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        monkeypatch.setenv(faults.ENV, "wait:0:3:30")
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        start = time.monotonic()
        faults.inject(3, 0)
        assert time.monotonic() - start < 10
        assert seen == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is handler  # restored
        faults.inject(3, 1)  # another rank: no wait
        monkeypatch.setenv(faults.ENV, "wait:0:3:0.2")
        start = time.monotonic()
        faults.inject(3, 0)  # no signal: waits at most its seconds
        assert 0.2 <= time.monotonic() - start < 5
    finally:
        signal.signal(signal.SIGUSR1, previous)
