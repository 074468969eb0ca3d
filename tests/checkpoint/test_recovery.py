"""Runs that lose nothing (issue 14): verified checkpoints, fallback to the newest intact one,
starting over only when asked, pruning that keeps what a recovery needs, metrics that match
the checkpoints, and a full disk that says so.

Every run is a real ``soda-mega train`` process on the tiny model; the error cases that stop
before training run in one process through ``untrusted_worker.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_run, rewrite, trace, train, train_args
from launch_env import clean_env

pytestmark = pytest.mark.distributed  # launches the CLI in subprocesses

WORKER = Path(__file__).with_name("untrusted_worker.py")


def _step(run: Path, n: int) -> Path:
    return run / "checkpoints" / f"step_{n:08d}"


def _damage(path: Path, offset: int | None = None, size: int = 4096) -> None:
    """4 KiB of other bytes in the middle of ``path`` (same length)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    data[start:start + size] = bytes((b + 1) % 256 for b in data[start:start + size])
    rewrite(path, bytes(data))


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_resume_false_over_checkpoints_is_refused_and_overwrite_moves_them_aside(
        corpus, train_run, tmp_path):
    run = copy_run(train_run, tmp_path / "run")
    refused = train(corpus, run, "--run.resume=false", "--run.max_steps=1", check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "--run.overwrite=true" in refused.stderr
    _no_traceback(refused)
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"

    # Today's bug: the new run's step_1 was pruned as "older" than the old run's step_2.
    proc = train(corpus, run, "--run.resume=false", "--run.overwrite=true", "--run.max_steps=2",
                 "--run.save_interval=1", "--run.keep_checkpoints=1")
    assert "moved checkpoints, metrics.jsonl" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert [r["step"] for r in trace(run)] == [1, 2]
    old = list((run / "replaced").glob("*/checkpoints/step_00000002/manifest.json"))
    assert len(old) == 1  # the old run's checkpoint, moved aside intact
    # The new run's step_2 has its own weights, not the old run's (both saved at step 2).
    new_state = json.loads((_step(run, 2) / "trainer_state.json").read_text())
    assert new_state["previous"] == "step_00000001"


def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(corpus, three_saves, tmp_path):
    run = copy_run(three_saves, tmp_path / "run")
    damaged = _step(run, 3) / "__0_0.distcp"
    _damage(damaged)
    with open(run / "metrics.jsonl", "a") as f:  # a line torn by a kill
        f.write('{"kind": "train", "step": 4, "lo')
    proc = train(corpus, run, "--run.max_steps=4", "--run.save_interval=1",
                 "--run.keep_checkpoints=3")
    assert str(damaged) in proc.stderr and "checksum mismatch" in proc.stderr, proc.stderr[-3000:]
    assert "resuming from step_00000002" in proc.stderr
    assert "dropped its last line" in proc.stderr
    got, want = trace(run), trace(three_saves)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    # Step 3 again from step 2's checkpoint: the same loss as the first time.
    assert got[2]["loss"] == pytest.approx(want[2]["loss"], rel=1e-6)
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    # The damaged folder stood where the new step_3 went: moved aside, not deleted.
    assert list((run / "checkpoints" / "replaced").glob("step_00000003-*/__0_0.distcp"))


def test_garbage_latest_falls_back_and_a_precision_change_is_announced(corpus, three_saves, tmp_path):
    run = copy_run(three_saves, tmp_path / "run")
    rewrite(run / "checkpoints" / "latest", b"\x00\xffgarbage")
    proc = train(corpus, run, "--run.max_steps=4", "--run.save_interval=0",
                 "--training.precision=bf16")
    assert "not the name of a checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step_00000003 at step 3" in proc.stdout
    assert "training.precision changes from fp32" in proc.stderr
    assert [r["step"] for r in trace(run)] == [1, 2, 3, 4]


def test_a_diverging_run_keeps_its_last_good_checkpoint(corpus, tmp_path):
    proc = train(corpus, tmp_path, "--training.lr=1e30", "--training.warmup_fraction=0",
                 "--run.max_bad_steps=3", "--training.clip_grad=0", "--run.save_interval=1",
                 "--run.keep_checkpoints=1", "--run.max_steps=8", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    skipped = [r["skipped"] for r in trace(tmp_path)]
    assert skipped[:4] == [False, True, True, True], skipped
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    # step_1: the last one without skipped steps; step_3: the newest (keep_checkpoints=1).
    assert kept == ["step_00000001", "step_00000003"]


def test_fresh_start_cuts_metrics_back_to_step_0(corpus, tmp_path):
    """A run killed before its first save left records (and a torn line) behind."""
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"kind": "train", "step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3))
        + '{"kind": "tra')
    proc = train(corpus, tmp_path, "--run.max_steps=2", "--run.save_interval=0")
    assert [r["step"] for r in trace(tmp_path)] == [1, 2]
    assert all(r["loss"] != 9.0 for r in trace(tmp_path))
    assert "dropped its last line" in proc.stderr


def _under_fsize_limit(limit: int, argv: list[str]) -> list[str]:
    """``argv`` run under a real file-size limit: writes past it fail with EFBIG (SIGXFSZ is
    ignored, and both settings survive the exec). Set in a small wrapper process rather than
    with ``preexec_fn``, which can deadlock when the pytest process has threads."""
    setup = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
             "os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", setup, *argv]


@pytest.mark.parametrize("async_save", ["true", "false"])
def test_a_full_disk_during_save_says_so_and_removes_the_partial_checkpoint(corpus, tmp_path,
                                                                            async_save):
    # A real limit on file size (a checkpoint file is ~18 MiB): the kernel fails the write (in
    # the background process of an asynchronous save, in Megatron's writers of a synchronous one).
    argv = [sys.executable, "-m", "soda_mega.cli",
            *train_args(corpus, tmp_path, "--run.max_steps=1", f"--run.async_save={async_save}")]
    proc = subprocess.run(_under_fsize_limit(4 << 20, argv), capture_output=True, text=True,
                          env=clean_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the disk is full (or a file size limit was hit)" in proc.stderr
    _no_traceback(proc)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []


def test_clear_errors_for_unusable_checkpoints(corpus, train_run, three_saves, tmp_path):
    """Each case stops with exit 2 and a message naming the file or value, no traceback (and
    a checkpoint without checksums, from an older soda-mega, still loads)."""
    cases = []

    def case(argv, *expect, rc=2):
        cases.append(({"argv": argv}, expect, rc))

    data = f"--data.train={corpus / 'speech'},{corpus / 'text'}"
    common = ["--preset", "tiny", data, "--run.max_steps=4", "--run.tensorboard=false",
              "--run.eval_interval=0"]
    # every checkpoint damaged: no silent restart from step 0
    all_bad = copy_run(three_saves, tmp_path / "all-bad")
    for n in (1, 2, 3):
        _damage(_step(all_bad, n) / "__0_1.distcp")
    case(["train", *common, f"--run.dir={all_bad}"], "no intact checkpoint to resume",
         str(_step(all_bad, 1) / "__0_1.distcp"), "--run.overwrite=true")
    # 'latest' names a folder that is gone, and there is no other
    gone = tmp_path / "gone"
    (gone / "checkpoints").mkdir(parents=True)
    (gone / "checkpoints" / "latest").write_text("step_00000056")
    case(["train", *common, f"--run.dir={gone}"], "names step_00000056, which does not exist")
    # run.overwrite without run.resume=false: starting over is asked for explicitly
    case(["train", *common, f"--run.dir={tmp_path / 'ow'}", "--run.overwrite=true"],
         "give it together with --run.resume=false")
    # another model in run.dir
    case(["train", *common, f"--run.dir={copy_run(train_run, tmp_path / 'other')}",
          "--model.num_layers=2"], "model.num_layers: checkpoint 4 != config 2")
    # truncated Megatron metadata (EOFError / "pickle data was truncated"), legacy and verified
    trunc = copy_run(train_run, tmp_path / "trunc")
    meta = _step(trunc, 2) / ".metadata"
    rewrite(meta, meta.read_bytes()[:1000])
    (_step(trunc, 2) / "manifest.json").unlink(missing_ok=True)  # as written by an older soda-mega
    for argv in (["eval", "nll", str(trunc), "--data", str(corpus / "speech"), "--max-batches", "1",
                  "--quiet"], ["export", "hf", str(trunc), str(tmp_path / "hf-trunc")]):
        case(argv, str(meta), "truncated")
    # a checkpoint of an older soda-mega (no manifest) still loads, with a notice
    legacy = copy_run(train_run, tmp_path / "legacy")
    (_step(legacy, 2) / "manifest.json").unlink(missing_ok=True)
    case(["eval", "nll", str(legacy), "--data", str(corpus / "speech"), "--max-batches", "1",
          "--quiet"], "checked for completeness only", rc=0)
    damaged = copy_run(train_run, tmp_path / "damaged")
    common_pt = _step(damaged, 2) / "common.pt"
    _damage(common_pt, offset=100, size=50)
    case(["export", "hf", str(damaged), str(tmp_path / "hf-damaged")], str(common_pt),
         "checksum mismatch")
    case(["train", "--preset", "tiny", data, "--run.max_steps=1", f"--run.dir={tmp_path / 'ft'}",
          f"--training.init_from={damaged}"], str(common_pt), "checksum mismatch")

    (tmp_path / "cases.json").write_text(json.dumps([c for c, _, _ in cases]))
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "cases.json"),
                           str(tmp_path / "results.json")], capture_output=True, text=True,
                          env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for (spec, expect, rc), result in zip(cases, json.loads((tmp_path / "results.json").read_text())):
        where = (spec["argv"][:2], result["stderr"][-3000:])
        assert result["rc"] == rc, where
        assert "Traceback" not in result["stderr"], where
        for text in expect:
            assert text in result["stderr"], (text, where)


def test_two_ranks_verify_a_share_each_and_fall_back_together(corpus, three_saves, tmp_path):
    """DP=2 resume of a one-process run: each rank hashes one of the two data files, only
    rank 1 sees the damage, and both ranks fall back to step 2 (then continue its trace)."""
    from tolerances import TRAINING_TRACE

    run = copy_run(three_saves, tmp_path / "run")
    damaged = _step(run, 3) / "__0_1.distcp"
    _damage(damaged)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "soda_mega.cli",
                           *train_args(corpus, run, "--run.max_steps=3", "--run.save_interval=0")],
                          capture_output=True, text=True, env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert str(damaged) in proc.stderr and "resuming from step_00000002" in proc.stderr
    got, want = trace(run), trace(three_saves)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[2]["loss"] == pytest.approx(want[2]["loss"], rel=TRAINING_TRACE["rtol"])
