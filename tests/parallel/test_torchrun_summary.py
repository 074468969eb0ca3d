"""soda_mega.parallel.torchrun's summary of failed workers (issue 33.4), from torchrun's own
ProcessFailure records and the error files the workers write (soda_mega.errors.record_error)."""

from __future__ import annotations

import io
import signal
import time

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from soda_mega.errors import ERROR_FILE_ENV, record_error
from soda_mega.parallel.torchrun import summarise


def _failure(tmp_path, monkeypatch, local_rank: int, exitcode: int, message: str | None = None):
    path = tmp_path / f"error-{local_rank}.json"
    if message is not None:
        monkeypatch.setenv(ERROR_FILE_ENV, str(path))
        record_error(message, "Traceback ...")
        time.sleep(0.001)
    return ProcessFailure(local_rank=local_rank, pid=100 + local_rank, exitcode=exitcode,
                          error_file=str(path))


def _summary(failures) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = summarise(failures, out=out)
    return code, out.getvalue().splitlines()


def test_a_stop_is_no_failure(tmp_path, monkeypatch):
    """Rank 0 exited 4 after saving; torchrun then stopped rank 1 with SIGTERM: nothing to add."""
    failures = {1: _failure(tmp_path, monkeypatch, 1, -signal.SIGTERM),
                0: _failure(tmp_path, monkeypatch, 0, 4)}
    assert _summary(failures) == (4, [])


def test_the_first_recorded_error_is_the_cause_and_the_others_follow(tmp_path, monkeypatch):
    cause = _failure(tmp_path, monkeypatch, 2, 1, "RuntimeError: CUDA error: an illegal memory access")
    after = _failure(tmp_path, monkeypatch, 0, 1, "RuntimeError: [gloo] Connection closed by peer")
    stopped = _failure(tmp_path, monkeypatch, 1, -signal.SIGTERM)
    code, lines = _summary({0: after, 1: stopped, 2: cause})
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("soda-mega: rank 2 (local rank 2 on "), lines
    assert lines[0].endswith(
        ", pid 102) crashed (exit 1): RuntimeError: CUDA error: an illegal memory access (its "
        "traceback is above); then rank 0: exit 1 (RuntimeError: [gloo] Connection closed by "
        "peer); rank 1: killed by SIGTERM (exit 143)"), lines


def test_a_rank_killed_outright_is_the_cause(tmp_path, monkeypatch):
    """The OOM killer's SIGKILL leaves no error file (its time: the whole second the agent saw
    it); the ranks whose collectives then failed recorded theirs later."""
    killed = ProcessFailure(local_rank=1, pid=101, exitcode=-signal.SIGKILL,
                            error_file=str(tmp_path / "none.json"))
    after = _failure(tmp_path, monkeypatch, 0, 1, "RuntimeError: [gloo] Connection closed by peer")
    code, lines = _summary({0: after, 1: killed})
    assert code == 1  # as torchrun's: the launchers restart a crashed run
    assert lines[0].startswith("soda-mega: rank 1 ") and "killed by SIGKILL (exit 137)" in lines[0]


def test_user_errors_are_said_once_per_node(tmp_path, monkeypatch):
    """Local rank 0 printed its error; the other ranks only recorded theirs: the summary adds
    those that differ, once each."""
    same = "configuration error: data.train: no datasets given"
    other = "error: /data/x/train/index.json: no such file"
    failures = {0: _failure(tmp_path, monkeypatch, 0, 2, same),
                1: _failure(tmp_path, monkeypatch, 1, 2, same),
                2: _failure(tmp_path, monkeypatch, 2, 2, other),
                3: _failure(tmp_path, monkeypatch, 3, 2, other)}
    assert _summary(failures) == (2, [f"soda-mega: {other} (rank 2)"])
