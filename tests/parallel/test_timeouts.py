"""parallel.init_timeout_s and parallel.collective_timeout_s bound the waits of a real gloo
group: a rank whose peer never joins fails after the configured seconds, not torch's 30 min."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from launch_env import clean_env

WORKER = Path(__file__).with_name("timeout_worker.py")


def _rank(rank: int, port: int, *seconds: float) -> subprocess.Popen:
    env = {**clean_env(), "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, seconds)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_timeout_ends_a_rendezvous_that_the_other_rank_never_joins():
    out, _ = _rank(0, _port(), 3, 1800).communicate(timeout=120)
    match = re.search(r"init failed after ([\d.]+) s: DistStoreError", out)
    assert match, out[-3000:]
    assert float(match.group(1)) < 30, out


def test_collective_timeout_ends_an_all_reduce_that_a_peer_never_enters():
    port = _port()
    peer = _rank(1, port, 120, 3)
    try:
        out, _ = _rank(0, port, 120, 3).communicate(timeout=120)
    finally:
        peer.kill()
        peer.communicate()
    match = re.search(r"all_reduce failed after ([\d.]+) s: .*Timed out", out)
    assert match, out[-3000:]
    assert 2.5 < float(match.group(1)) < 30, out
