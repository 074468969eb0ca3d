"""Training from object storage (issue 12 item 7): the tiny model trains from s3:// on a real
S3 server (moto, 127.0.0.1) through a node cache smaller than the dataset; killed with -9 and
resumed on another DP size, it follows the trace of the same run from local disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_env import clean_env
from soda_mega.config import load_config
from soda_mega.data.write.synthetic import random_docs, write_split
from soda_mega.tokens import VocabLayout
from tolerances import TRAINING_TRACE

pytestmark = pytest.mark.distributed

STEPS = 4


def _args(train: list[str], run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "soda_mega.cli", "train", "--preset", "tiny",
            f"--data.train={','.join(train)}", f"--run.dir={run_dir}", f"--run.max_steps={STEPS}",
            "--run.save_interval=1", "--run.eval_interval=0", "--run.log_interval=1",
            "--run.tensorboard=false", "--training.adam_eps=1e-8", "--data.shuffle_window=2", *extra]


def _trace(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def _run(cmd, env, procs=1):
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(procs)] + cmd[1:]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    errors = [x for x in proc.stderr.splitlines() if "soda-mega" in x]
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{errors}\n{proc.stderr[-3000:]}"


def test_train_from_s3_with_eviction_kill_and_dp_change_follows_local(s3_server, tmp_path):
    layout = VocabLayout.from_config(load_config(preset="tiny").vocab)
    local = []
    for name, kind, n in (("speech", "speech", 120), ("text", "text", 60)):
        root = tmp_path / "corpus" / name
        write_split(root / "train", layout, random_docs(layout, n, 20, 300, 1, kind), kind,
                    hashes=["xxh64"])
        local.append(str(root))
    bucket = s3_server.new_bucket()
    for path in sorted((tmp_path / "corpus").rglob("*")):
        if path.is_file():
            s3_server.client.upload_file(str(path), bucket, str(path.relative_to(tmp_path)))
    remote = [f"s3://{bucket}/corpus/speech", f"s3://{bucket}/corpus/text"]
    shards = sum(p.stat().st_size for p in (tmp_path / "corpus").rglob("shard.*"))
    env = s3_server.env(clean_env())

    _run(_args(local, tmp_path / "local"), env)

    cache = tmp_path / "cache"
    cmd = _args(remote, tmp_path / "s3", f"--data.cache_dir={cache}",
                f"--data.cache_limit={shards // 3}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    ckpts = tmp_path / "s3" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts / "step_00000002").exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = (ckpts / "latest").read_text()
    assert int(latest[5:]) < STEPS, "the kill came too late"
    _run(cmd, env, procs=2)  # resumed on DP=2
    got, want = _trace(tmp_path / "s3"), _trace(tmp_path / "local")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=TRAINING_TRACE["rtol"]), a["step"]
    cached = sum(p.stat().st_size for p in cache.rglob("shard.*.mds"))
    assert 0 < cached <= shards // 3
