"""One build over many machines (issue 17): `data build --part I/N` shares, the last part (or
`--finalize`) merges, and the result equals a one-machine build byte for byte."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from build_helpers import codes_corpus, tiny_config, tree_bytes
from soda_mega.cli import main
from soda_mega.data.schema import META_FILE
from soda_mega.data.write.builder import (
    BuildError,
    build_dataset,
    finalize_dataset,
    parse_part,
    part_from_env,
    part_units,
)

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launchers" / "data_build.sbatch"


def _interrupt_after(n: int):
    def hook(name: str, completed: int) -> None:
        if completed == n:
            raise KeyboardInterrupt(f"simulated kill after {name}")
    return hook


def test_part_shares_are_disjoint_cover_everything_and_come_from_slurm():
    for n in (1, 2, 3, 7):
        shares = [part_units(10, (i, n)) for i in range(n)]
        assert sorted(u for s in shares for u in s) == list(range(10))
    assert part_units(10, (1, 3)) == [1, 4, 7]
    assert parse_part("2/3") == (2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(BuildError, match="--part"):
            parse_part(bad)
    assert part_from_env({}) is None
    assert part_from_env({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3",
                          "SLURM_ARRAY_TASK_MIN": "3"}) == (1, 3)
    assert part_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 3)
    # --array=0-30:2 is 16 tasks with ids 0, 2, ..., 30
    stepped = {"SLURM_ARRAY_TASK_COUNT": "16", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_ARRAY_TASK_STEP": "2"}
    assert [part_from_env({**stepped, "SLURM_ARRAY_TASK_ID": str(t)}) for t in (0, 2, 30)] == [
        (0, 16), (1, 16), (15, 16)]
    # --array=1,5,6 (no step): the ids say nothing of the part
    with pytest.raises(BuildError, match=r"SLURM_ARRAY_TASK_ID=5 .*--array=0-2.*--part"):
        part_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3",
                       "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "1"})


def test_three_parts_in_any_order_one_killed_and_rerun_equal_the_one_machine_build(tmp_path):
    manifest = codes_corpus(tmp_path / "in", n=11)  # 6 units of 2 recordings
    cfg = tiny_config()
    single = build_dataset(tmp_path / "single", [manifest], "speech", cfg, show_progress=False)
    assert single.units == 6
    out = tmp_path / "parts"
    # part 2 first: it builds units 2 and 5 and leaves the merge to the others
    r2 = build_dataset(out, [manifest], "speech", cfg, show_progress=False, part=(2, 3))
    assert not r2.finalized and r2.units_built == 2 and r2.units_missing == 4 and r2.part == "2/3"
    assert not (out / "train" / "index.json").exists()
    # part 0 is killed after its first unit, leaving debris of the second
    with pytest.raises(KeyboardInterrupt):
        build_dataset(out, [manifest], "speech", cfg, show_progress=False, part=(0, 3),
                      on_unit_done=_interrupt_after(1))
    (out / "train" / "units" / "u000003.tmp-4242").mkdir(parents=True)
    # part 1 runs meanwhile (with workers): it must not touch part 0's debris, and it is not last
    r1 = build_dataset(out, [manifest], "speech", tiny_config("--data.build_workers=2"),
                       show_progress=False, part=(1, 3))
    assert not r1.finalized and r1.units_missing == 1
    assert (out / "train" / "units" / "u000003.tmp-4242").is_dir()
    with pytest.raises(BuildError, match="1 of 6 units are not built yet \\(u000003\\)"):
        finalize_dataset(out, show_progress=False)
    # part 0 rerun: resumes (its finished unit is kept), cleans its debris, finishes last and merges
    r0 = build_dataset(out, [manifest], "speech", cfg, show_progress=False, part=(0, 3))
    assert r0.finalized and r0.units_built == 1 and r0.units_resumed == 1
    assert tree_bytes(out) == tree_bytes(tmp_path / "single")
    assert r0.splits == single.splits
    # an explicit --finalize writes the same bytes again
    (out / "train" / META_FILE).unlink()
    finalize_dataset(out, show_progress=False)
    assert tree_bytes(out) == tree_bytes(tmp_path / "single")


def test_cli_part_and_finalize(tmp_path, capsys):
    manifest = codes_corpus(tmp_path / "in", n=4)
    out = tmp_path / "out"
    common = ["--manifest", str(manifest), "--preset", "tiny", "--quiet", "--data.build_workers=0",
              "--data.valid_fraction=0.3", "--data.build_unit_recordings=2"]
    assert main(["data", "build", str(out), *common, "--part", "1/2"]) == 0
    assert "still missing" in capsys.readouterr().out
    assert main(["data", "build", "--finalize", str(out)]) == 2
    assert "1 of 2 units are not built yet" in capsys.readouterr().err
    env = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert main(["data", "build", str(out), *common]) == 0  # part 0/2 from SLURM, merges
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert "built speech dataset" in capsys.readouterr().out
    assert main(["data", "build", "--finalize", str(out), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["finalized"] and result["units"] == 2
    assert main(["data", "build", str(tmp_path / "x"), *common, "--part", "2/2"]) == 2
    assert "need 0 <= I < N" in capsys.readouterr().err


def test_more_parts_than_work_units_say_which_array_fits(tmp_path, capsys):
    """Issue 33.8: 4 recordings in units of 2 for 3 parts leave one part idle: every part says
    so, with the --array that fits (also under --quiet: it is about the job, not progress)."""
    manifest = codes_corpus(tmp_path / "in", n=4)
    common = ["--manifest", str(manifest), "--preset", "tiny", "--quiet", "--data.build_workers=0",
              "--data.build_unit_recordings=2"]
    assert main(["data", "build", str(tmp_path / "out"), *common, "--part", "2/3"]) == 0
    err = capsys.readouterr().err
    assert ("NOTE: 2 work units (data.build_unit_recordings=2 recordings each) for 3 parts: 1 "
            "part has nothing to do; submit --array=0-1 (or give --part I/2), or lower "
            "data.build_unit_recordings") in err, err
    assert main(["data", "build", str(tmp_path / "out2"), *common, "--part", "1/2"]) == 0
    assert "nothing to do" not in capsys.readouterr().err


def test_array_launcher_dry_run_prints_the_parts(tmp_path):
    manifest = codes_corpus(tmp_path / "in", n=3)
    env = dict(os.environ, DRY_RUN="1", PARTS="3", OUT=str(tmp_path / "out"),
               BUILD_ARGS=f"--manifest {manifest} --preset tiny", SODA_MEGA="soda-mega")
    proc = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for i in range(3):
        assert any(f"--part {i}/3" in line and str(tmp_path / "out") in line and str(manifest) in line
                   for line in lines), proc.stdout
    assert any(f"data build --finalize {tmp_path / 'out'}" in line for line in lines)
    assert "sbatch --array=0-2" in proc.stdout
    assert not (tmp_path / "out").exists()  # a dry run builds nothing


def test_array_launcher_dry_run_prints_the_dependent_finalize_job(tmp_path):
    """Issue 33.8: the dry run ends with the two lines that submit the array and, depending on
    it (afterok), the merge; pasted into bash they submit exactly that (a stand-in sbatch)."""
    out = tmp_path / "my out"  # a space: the merge command is quoted twice (bash, then --wrap's sh)
    env = dict(os.environ, DRY_RUN="1", PARTS="3", OUT=str(out), BUILD_ARGS="--manifest m.jsonl",
               SODA_MEGA="soda-mega")
    proc = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("JOB=$(sbatch"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > '
                                    f'{tmp_path}/sbatch.$$\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    run = subprocess.run(["bash", "-c", "\n".join(lines[start:start + 2])], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert run.returncode == 0, run.stderr
    calls = sorted((p.read_text().splitlines() for p in tmp_path.glob("sbatch.*")), key=len)
    assert ["--array=0-2", "--parsable", "--export=ALL", str(SBATCH)] == calls[0] or \
        calls[0][:3] == ["--array=0-2", "--parsable", "--export=ALL"], calls
    finalize = next(c for c in calls if any(a.startswith("--dependency") for a in c))
    assert "--dependency=afterok:4242" in finalize, finalize
    wrap = next(a for a in finalize if a.startswith("--wrap="))[len("--wrap="):]
    # what the finalize job's sh runs: the merge of exactly OUT
    argv = subprocess.run(["sh", "-c", f"printf '%s\\n' {wrap}"], capture_output=True,
                          text=True).stdout.splitlines()
    assert argv == ["soda-mega", "data", "build", "--finalize", str(out)], argv


def test_markers_of_an_older_build_without_the_index_still_merge(tmp_path):
    manifest = codes_corpus(tmp_path / "in", n=4)
    out = tmp_path / "out"
    build_dataset(out, [manifest], "speech", tiny_config(), show_progress=False)
    expected = {k: v for k, v in tree_bytes(out).items() if not k.startswith(".build")}
    for marker in (out / ".build" / "units").glob("*.json"):
        old = json.loads(marker.read_text())
        del old["shards"]
        marker.write_text(json.dumps(old))
    again = build_dataset(out, [manifest], "speech", tiny_config(), show_progress=False)
    assert again.units_resumed == again.units == 2
    assert {k: v for k, v in tree_bytes(out).items() if not k.startswith(".build")} == expected


def _plant_lock(out: Path, part: str, **owner) -> Path:
    """A part lock as a builder writes it (host, pid, start time, SLURM task)."""
    path = out / ".build" / "locks" / f"part-{part.replace('/', '-of-')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm": None,
                                "started": time.time(), **owner}))
    return path


def test_a_part_being_built_is_not_built_twice_at_once(tmp_path, capsys):
    """Two builders of one part (a requeued array task whose first run still lives, a part
    started by hand twice) deleted each other's half-written units; the second now refuses."""
    manifest = codes_corpus(tmp_path / "in", n=4)
    out = tmp_path / "out"
    common = ["--manifest", str(manifest), "--preset", "tiny", "--quiet", "--data.build_workers=0",
              "--data.valid_fraction=0.3", "--data.build_unit_recordings=2"]
    assert main(["data", "build", str(out), *common, "--part", "0/2"]) == 0
    capsys.readouterr()
    with subprocess.Popen(["sleep", "60"]) as owner:  # a live builder of part 1/2 on this host
        try:
            lock = _plant_lock(out, "1/2", pid=owner.pid)
            assert main(["data", "build", str(out), *common, "--part", "1/2"]) == 2
            err = capsys.readouterr().err
            assert f"part 1/2 of {out} is being built by pid {owner.pid} on " in err, err
            assert str(lock) in err
            assert not (out / "train" / "index.json").exists()
            # another part is not held up by it
            assert main(["data", "build", str(out), *common, "--part", "0/2"]) == 0
        finally:
            owner.kill()
    owner.wait()
    # the owner is gone (killed): its lock is stale and the part is built
    assert main(["data", "build", str(out), *common, "--part", "1/2"]) == 0
    assert "built speech dataset" in capsys.readouterr().out
    assert not lock.exists()


@pytest.mark.parametrize("owner", [
    {"host": "another-node", "pid": 1, "slurm": "77_3"},       # this task's requeued run
    {"host": "another-node", "pid": 1, "started": 0.0},       # heartbeat long stopped
])
def test_stale_part_locks_are_taken_over(tmp_path, monkeypatch, owner):
    from soda_mega.data.write.part_lock import PartLock

    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    path = _plant_lock(tmp_path, "3/4", **owner)
    if "started" in owner:
        os.utime(path, (0, 0))
    with PartLock(tmp_path, (3, 4)) as held:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert "took over" in held.note
    assert not path.exists()


def test_a_live_lock_on_another_node_is_respected(tmp_path):
    from soda_mega.data.write.part_lock import PartBusyError, PartLock

    path = _plant_lock(tmp_path, "0/1", host="another-node", pid=1)
    with pytest.raises(PartBusyError, match="another-node"):
        with PartLock(tmp_path, None):
            pass
    assert json.loads(path.read_text())["host"] == "another-node"


def test_an_unreadable_lock_is_busy_while_fresh_and_stale_when_old(tmp_path):
    from soda_mega.data.write.part_lock import PartBusyError, PartLock

    path = tmp_path / ".build" / "locks" / "part-0-of-2.json"
    path.parent.mkdir(parents=True)
    path.write_text("")  # being written by its owner (no hard links on this file system)
    with pytest.raises(PartBusyError, match="part 0/2 .* being claimed by another builder"):
        with PartLock(tmp_path, (0, 2)):
            pass
    os.utime(path, (0, 0))  # torn long ago
    with PartLock(tmp_path, (0, 2)) as held:
        assert "unreadable" in held.note
