"""Issue 32 item 5: a file of a dataset or a run folder that is not a regular file cannot hang a
command, and SIGTERM stays effective while ``train`` sets up.

Before the fix ``doc_lengths.npy`` as a FIFO blocked ``data inspect``, ``eval nll`` and
``train`` forever in ``open()`` (the trainer's watchdog is armed only later, and its SIGTERM
handler only records the signal), and ``checkpoints/latest`` as a FIFO blocked ``train`` until
the step timeout. Each must now end with exit 2 and one line naming the file. Every command
runs under a timeout, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sec_ckpt_helpers import _child_env, run_cli_cases, tiny_checkpoint, tiny_dataset

pytestmark = pytest.mark.distributed  # launches the CLI in a subprocess

REPO = Path(__file__).resolve().parents[2]


def _fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def _refused(result: dict, *needles: str) -> str | None:
    """Why ``result`` is not a refusal (exit 2, no traceback, one line holding every needle)."""
    err = result["stderr"]
    lines = [line for line in err.splitlines() if all(n in line for n in needles)]
    if result["rc"] != 2 or "Traceback" in err or len(lines) != 1:
        return f"rc {result['rc']}, {len(lines)} lines naming {needles}: {err[-1500:]}"
    return None


def test_fifos_in_a_dataset_or_run_folder_are_refused_not_waited_on(tmp_path_factory, tmp_path):
    step = tiny_checkpoint(tmp_path_factory)
    lengths = tiny_dataset(tmp_path / "lengths")
    for split in ("train", "valid"):
        _fifo(lengths / split / "doc_lengths.npy")
    index = tiny_dataset(tmp_path / "index")
    _fifo(index / "train" / "index.json")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _fifo(run / "checkpoints" / "latest")
    train = ["train", "--preset", "tiny", "--run.max_steps=1", "--run.tensorboard=false",
             "--run.eval_interval=0"]
    cases = [
        (["data", "inspect", str(lengths)], ("doc_lengths.npy", "FIFO")),
        (["data", "inspect", str(index)], ("index.json", "FIFO")),
        (["eval", "nll", str(step), "--data", str(lengths)], ("doc_lengths.npy", "FIFO")),
        ([*train, f"--data.train={lengths}", f"--run.dir={tmp_path / 'run-lengths'}"],
         ("doc_lengths.npy", "FIFO")),
        ([*train, f"--data.train={tiny_dataset(tmp_path / 'good')}", f"--run.dir={run}",
          "--run.step_timeout_s=600"], ("latest", "FIFO")),
        (["eval", "nll", str(run), "--data", str(tmp_path / "good")], ("latest", "FIFO")),
    ]
    results = run_cli_cases([argv for argv, _ in cases], tmp_path, each=45, timeout=600)
    failures = [f"{' '.join(argv[:2])} ({needles[0]}): {why}"
                for (argv, needles), result in zip(cases, results)
                if (why := _refused(result, *needles))]
    assert not failures, "\n\n".join(failures)


_SETUP_STUCK = """
import sys
from soda_mega.training import preemption
preemption.SETUP_STOP_GRACE_S = 3.0
from soda_mega.cli import console_main
sys.argv = ["soda-mega", *sys.argv[1:]]
sys.exit(console_main())
"""


def test_sigterm_ends_a_train_whose_set_up_is_stuck(tmp_path):
    """A stop signal during set-up (nothing to save yet) ends the run with exit 4 within a
    grace period, also when the set-up is stuck in a read (here: the set-up fault sleeps)."""
    data = tiny_dataset(tmp_path / "ds")
    err_path = tmp_path / "stderr.txt"
    env = {**_child_env(), "SODA_MEGA_FAULT": "sleep:0:0:300"}
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SETUP_STUCK, "train", "--preset", "tiny",
             f"--data.train={data}", f"--run.dir={tmp_path / 'run'}", "--run.max_steps=1",
             "--run.tensorboard=false"], stdout=subprocess.DEVNULL, stderr=err, env=env,
            cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while "SODA_MEGA_FAULT" not in err_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err_path.read_text()[-3000:]
            time.sleep(0.1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err_path.read_text()
    assert rc == 4, f"rc {rc}: {text[-3000:]}"
    assert took < 30, took
    assert "SIGTERM" in text and "before this run's first step" in text, text[-3000:]
