"""A process whose loader failed still exits (the suite hung in CI on this).

DataLoader workers ignore SIGTERM (it is the trainer's: it saves first), but at interpreter exit
``multiprocessing`` ends the daemon children it still knows of with SIGTERM and then waits for
them. A loader iterator still alive at exit (a worker's exception kept with its traceback, as
``pytest.raises`` does) therefore made the process wait forever for its own workers.

Each case runs in its own session and writes its output to a file: a hang is a timeout here,
and the workers are killed with the session instead of keeping a pipe open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from soda_mega.config import load_config
from soda_mega.data.write.synthetic import random_docs, write_split
from soda_mega.tokens import VocabLayout

EXIT_WITHIN_S = 120  # a clean run takes a few seconds; the bug never ends


@pytest.fixture
def garbled(tmp_path):
    layout = VocabLayout.from_config(load_config(preset="tiny").vocab)
    root = tmp_path / "ds"
    write_split(root / "train", layout, random_docs(layout, 30, 10, 60, 3, "speech"), "speech")
    shard = root / "train" / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:] = b"\xff" * (len(data) - len(data) // 2)
    shard.write_bytes(bytes(data))
    return root


def _run_in_session(args: list[str], tmp_path) -> tuple[int, str]:
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": os.getcwd()})
        try:
            code = proc.wait(timeout=EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"the process did not exit within {EXIT_WITHIN_S} s:\n"
                        + log.read_text()[-3000:])
    return code, log.read_text()


def test_process_exits_while_a_failed_loader_iterator_is_alive(garbled, tmp_path):
    script = textwrap.dedent(f"""
        import itertools
        from soda_mega.config import load_config
        from soda_mega.data.read.loader import SodaDataLoader
        from soda_mega.data.read.source import DatasetError

        cfg = load_config(preset="tiny", overrides=[
            "--data.train={garbled}", "--model.seq_length=32", "--data.num_workers=2",
            "--training.global_batch_size=2", "--training.micro_batch_size=2"])
        loader = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True)
        try:
            list(itertools.islice(iter(loader), 60))
        except DatasetError as err:
            kept = err  # its traceback keeps the loader's frames alive up to exit
            print("caught:", err, flush=True)
        """)
    code, out = _run_in_session([sys.executable, "-c", script], tmp_path)
    assert "caught:" in out, out[-3000:]
    assert code == 0, out[-3000:]


def test_train_on_a_garbled_shard_with_workers_exits_with_the_user_error(garbled, tmp_path):
    code, out = _run_in_session([
        sys.executable, "-m", "soda_mega.cli", "train", "--preset", "tiny",
        f"--data.train={garbled}", f"--run.dir={tmp_path / 'run'}", "--run.max_steps=20",
        "--data.num_workers=2", "--model.seq_length=32", "--training.global_batch_size=2",
        "--training.micro_batch_size=2"], tmp_path)
    assert code == 2, out[-3000:]
    assert "shard.00001.mds" in out, out[-3000:]


def test_exit_ends_daemon_helpers_that_ignore_sigterm(tmp_path):
    """The exit hook alone (no loader): a daemon helper that ignores SIGTERM and never returns."""
    script = textwrap.dedent("""
        import multiprocessing, time
        from soda_mega.utils import lifetime

        def helper(ready):
            lifetime.ignore_stop_signals()
            ready.set()
            while True:
                time.sleep(1)

        if __name__ == "__main__":
            lifetime.end_helpers_at_exit()
            ctx = multiprocessing.get_context("fork")
            ready = ctx.Event()
            child = ctx.Process(target=helper, args=(ready,), daemon=True)
            child.start()
            assert ready.wait(60)
            print("helper", child.pid, flush=True)
        """)
    path = tmp_path / "helper_exit.py"
    path.write_text(script)
    code, out = _run_in_session([sys.executable, str(path)], tmp_path)
    assert code == 0 and "helper" in out, out[-3000:]
    pid = int(out.split("helper", 1)[1].split()[0])
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
