"""Launcher configs and dry runs: every preset resolves to a valid layout on 8-GPU nodes; the
launchers report the trainer's exit code and requeue a run that saved on SIGUSR1 (slurm.sbatch
under a stand-in srun / scontrol)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from soda_mega.cli import main
from soda_mega.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "launchers" / "configs"
PRESETS = ("soda-135m", "soda-600m", "soda-1.7b", "soda-4b")


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_configs_follow_the_soda_recipe(preset):
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    assert cfg.model.name == preset
    assert cfg.training.global_batch_size == 512 and cfg.model.seq_length == 4096
    assert cfg.training.train_tokens == 5e11
    assert cfg.training.lr is None  # the SODA rule
    assert (cfg.training.adam_beta1, cfg.training.adam_beta2, cfg.training.adam_eps) == (0.98, 0.98, 1e-16)
    assert (cfg.training.weight_decay, cfg.training.z_loss, cfg.training.clip_grad) == (0.033, 1e-4, 1.0)
    assert (cfg.training.warmup_fraction, cfg.training.decay_fraction) == (0.1, 0.2)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("nodes", [1, 4])
def test_dry_run_prints_layout_and_memory(preset, nodes, capsys):
    world = 8 * nodes
    assert main(["train", "--config", str(CONFIGS / f"{preset}.yaml"), "--dry-run",
                 "--world-size", str(world)]) == 0
    out = capsys.readouterr().out
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    dp = world // (tp * pp)
    assert f"world {world} = TP {tp} x PP {pp} x DP {dp}" in out
    micro = 512 // (dp * cfg.training.micro_batch_size)
    assert f"{micro} micro-batches of {cfg.training.micro_batch_size} per replica" in out
    assert "steps 122071" in out or "steps 238419" in out
    total = float(re.search(r"total\s+([\d.]+) GiB", out).group(1))
    assert 0 < total < 80, f"{preset} would not fit an 80 GB H100: {total} GiB"


def test_dry_run_refuses_impossible_layouts(capsys):
    assert main(["train", "--config", str(CONFIGS / "soda-4b.yaml"), "--dry-run",
                 "--world-size", "3"]) == 2
    assert "world size 3 is not a multiple of TP x PP = 2" in capsys.readouterr().err


def test_dry_run_checks_the_data_paths(tmp_path, tiny_corpus, capsys):
    """Issue 33.6: `train --dry-run` opens data.train as the run would (index, metadata,
    vocabulary): a wrong path fails there with exit 2 and one line naming it."""
    missing = tmp_path / "no-such-corpus"
    assert main(["train", "--preset", "tiny", "--dry-run", f"--data.train={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"soda-mega: error: {missing} has no 'train' split" in err, err
    assert main(["train", "--preset", "tiny", "--dry-run", *tiny_corpus]) == 0
    out = capsys.readouterr().out
    root = tiny_corpus[0].split("=", 1)[1].split(",")[0]
    assert "# data" in out and re.search(rf"{re.escape(root)}/train: 60 documents, [\d,]+ tokens", out), out
    # Issue 33.8: a dataset built with another --preset (the tiny vocabulary) for a soda-135m run
    # fails in one line naming the dataset, both values and the --preset that must agree.
    assert main(["train", "--preset", "soda-135m", "--dry-run", *tiny_corpus]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"soda-mega: error: {root}/train was built for "
                                                   "another vocabulary layout"), lines
    assert "`data build --preset`" in lines[0] and "text_vocab_size: dataset 258 != model 128256" \
        in lines[0], lines


def test_torchrun_launcher_dry_run():
    env = dict(os.environ, CONFIG=str(CONFIGS / "soda-1.7b.yaml"), NGPUS="8")
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "torchrun.sh"), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "world 8 = TP 1 x PP 1 x DP 8" in proc.stdout


def test_slurm_script_parses():
    proc = subprocess.run(["bash", "-n", str(ROOT / "launchers" / "slurm.sbatch")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (ROOT / "launchers" / "slurm.sbatch").read_text()
    assert "--requeue" in text and "rdzv-endpoint" in text and "scontrol requeue" in text


def _sbatch_options(text: str) -> dict[str, str]:
    """The ``#SBATCH --key=value`` lines of a script, as sbatch reads them."""
    found = re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", text, re.M)
    return {key: value for key, value in found}


def _requeueing_scripts(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """The text of every batch script the project ships or writes that requeues itself."""
    from soda_mega.scaling.manifest import Manifest
    from soda_mega.scaling.sweep import slurm_script

    monkeypatch.chdir(tmp_path)
    # the script only counts the runs (one array task each)
    manifest = Manifest(tmp_path / "manifest.json", {"grid": {"name": "g"}}, [None], [])
    scripts = {name: (ROOT / "launchers" / name).read_text()
               for name in ("slurm.sbatch", "data_build.sbatch")}
    scripts["sweep.sbatch"] = slurm_script(manifest, tmp_path / "results.csv")
    return scripts


def test_requeued_jobs_append_to_their_output(tmp_path, monkeypatch):
    """Issue 33.3: Slurm truncates a job's output file when it starts the job again, so without
    --open-mode=append a requeue erases the crash, the restarts and everything before it."""
    for name, text in _requeueing_scripts(tmp_path, monkeypatch).items():
        options = _sbatch_options(text)
        assert "requeue" in options, name
        assert options.get("open-mode") == "append", f"{name}: a requeue truncates its output"


@pytest.mark.parametrize("script", ["slurm.sbatch", "data_build.sbatch"])
def test_slurm_output_file_needs_no_folder_in_the_submit_directory(script):
    """Issue 33.6: Slurm opens --output before the script runs, relative to the folder sbatch
    ran in; a folder missing there fails the job with no output at all (the reason only in
    slurmd's log), so the file goes into that folder itself."""
    output = _sbatch_options((ROOT / "launchers" / script).read_text())["output"]
    assert "/" not in output, output


def test_data_build_array_submitted_outside_the_repository_says_so(tmp_path):
    """Issue 33.8, as 33.6 for slurm.sbatch: an array task submitted from a folder without the
    repository's soda-mega says where to submit from in one line (exit 2), builds nothing."""
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_SUBMIT_DIR": str(elsewhere),
           "SLURM_ARRAY_JOB_ID": "90", "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1",
           "OUT": str(tmp_path / "out"), "BUILD_ARGS": "--manifest m.jsonl"}
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "data_build.sbatch")], cwd=elsewhere,
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        f"soda-mega data build: no soda-mega command in {elsewhere}, the folder the job was "
        "submitted from: submit from the repository (cd path/to/soda-mega && sbatch ... "
        "launchers/data_build.sbatch) or set SODA_MEGA to the soda-mega command"], proc.stderr
    assert not (tmp_path / "out").exists()


def test_slurm_script_submitted_outside_the_repository_says_so(tmp_path):
    """Issue 33.6: submitted from another folder, the default interpreter cannot import
    soda_mega; one line says where to submit from, before any srun, and the job exits 2."""
    bin_dir = _fake_slurm(tmp_path)
    # python3 without site-packages (so without an installed soda-mega), as on a login node
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} -S -I "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    env = _launch_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77",
                      SLURM_SUBMIT_DIR=str(elsewhere), SLURM_JOB_NODELIST="localhost",
                      SLURM_NNODES="1", SODA_MEGA_STATUS_FILE=str(tmp_path / "status"))
    env.pop("PYTHON")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "slurm.sbatch")], cwd=elsewhere,
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"soda-mega: python3 cannot import soda_mega in {elsewhere}, the folder the job was "
            "submitted from") in proc.stderr
    assert not (tmp_path / "srun.log").exists(), "srun ran"


def _fake_slurm(tmp_path: Path) -> Path:
    """`srun` that runs its command here (noting it in srun.log) and `scontrol` that answers
    `show hostnames` and records `requeue`: enough of SLURM to run slurm.sbatch's logic on one
    machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path / "srun.log"}\n'
                                  'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\nif [ "$1" = show ]; then echo localhost; exit 0; fi\n'
        f'echo "$@" >> {tmp_path / "scontrol.log"}\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def _assert_short(proc: subprocess.CompletedProcess, most: int = 14) -> None:
    """Issue 33.4: a run that ended as planned says so in a few lines: no traceback, no line
    of torchrun's agent, no report of failed workers (torchrun's for exit codes but 0)."""
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not [line for line in lines if "Traceback" in line or "torch/distributed" in line
                or "FAILED" in line or "TCPStore" in line], lines
    assert len(lines) <= most, lines


def _launch_env(tmp_path: Path, **extra: str) -> dict:
    from launch_env import clean_env

    config = tmp_path / "config.yaml"
    config.write_text("preset: tiny\n")
    return {**clean_env(), "CONFIG": str(config), "PYTHON": sys.executable, **extra}


@pytest.mark.distributed
def test_slurm_script_requeues_a_run_that_saved_on_sigusr1(tmp_path, tiny_corpus):
    bin_dir = _fake_slurm(tmp_path)
    env = _launch_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
                      SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", GPUS_PER_NODE="1",
                      MASTER_PORT=str(_free_port()),
                      SODA_MEGA_STATUS_FILE=str(tmp_path / "status"),
                      SODA_MEGA_FAULT="signal:0:2:SIGUSR1")
    run_dir = tmp_path / "run"
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "slurm.sbatch"), *tiny_corpus,
                           f"--run.dir={run_dir}", "--run.max_steps=5", "--run.eval_interval=0",
                           "--run.tensorboard=false"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 4, (proc.stdout + proc.stderr)[-4000:]
    # Issue 33.4: a stop is no failure: one summary line, none of torchrun's failure report
    assert proc.stdout.splitlines()[-1] == (
        "soda-mega: stopped cleanly at step 2 (exit 4); requeueing job 4242 (it resumes from the "
        "checkpoint)"), proc.stdout
    _assert_short(proc)
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"


@pytest.mark.distributed
def test_torchrun_launcher_reports_a_batch_that_does_not_split_over_data_parallel(tmp_path,
                                                                                tiny_corpus):
    """2 workers (DP=2) with a global batch of 7: refused at start-up with exit 2, naming the
    field, not a Megatron traceback reported by torchrun as exit 1."""
    env = _launch_env(tmp_path, NGPUS="2")
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "torchrun.sh"), *tiny_corpus,
                           f"--run.dir={tmp_path / 'run'}", "--training.global_batch_size=7",
                           "--training.micro_batch_size=1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    error = ("configuration error: training.global_batch_size: 7 must be a multiple of "
             "training.micro_batch_size=1 x data-parallel size 2")
    # Issue 33.4: the error once (rank 0; the other rank's same line is not repeated), then one
    # summary line, and none of torchrun's failure report (a traceback and a table per node).
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if error in line] == [
        f"soda-mega: {error} (world 2 / TP x PP 1)",
        f"soda-mega: stopped (exit 2): {error} (world 2 / TP x PP 1)"], lines
    assert len(lines) == 2, lines


@pytest.mark.distributed
def test_training_start_prints_the_layout_once(tmp_path, tiny_corpus):
    """Issue 33.5: the start of a run says its whole layout (world, DP/TP/PP, micro and global
    batch, gradient accumulation, where rank 0 runs), once, from rank 0. Issue 33.4: a finished
    run ends in one line with its step."""
    env = _launch_env(tmp_path, NGPUS="2", MASTER_PORT=str(_free_port()))
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "torchrun.sh"), *tiny_corpus,
                           f"--run.dir={tmp_path / 'run'}", "--run.max_steps=1",
                           "--training.global_batch_size=4", "--training.micro_batch_size=1",
                           "--run.eval_interval=0", "--run.tensorboard=false"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stderr.splitlines()[-1] == "soda-mega: finished: step 1", proc.stderr
    _assert_short(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("soda-mega: layout: ")]
    assert lines == [
        "soda-mega: layout: world 2 = TP 1 x PP 1 x DP 2 (1 node x 2 processes); global batch 4 = "
        "micro-batch 1 x 2 gradient-accumulation steps x DP 2, of 128 tokens (512 per step); "
        f"rank 0 on {socket.gethostname()}"], proc.stdout[-4000:]


@pytest.mark.distributed
def test_a_crash_names_its_rank_and_its_error(tmp_path, tiny_corpus):
    """Issue 33.4: rank 1 raises in step 1: the crash is still shown (its traceback), then one
    line names the failing rank, its host and pid, and its error; torchrun's own report (a
    traceback of torchrun itself around a table per node) is not printed."""
    env = _launch_env(tmp_path, NGPUS="2", MASTER_PORT=str(_free_port()), MAX_RESTARTS="0",
                      SODA_MEGA_FAULT="raise:1:1:boom")
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "torchrun.sh"), *tiny_corpus,
                           f"--run.dir={tmp_path / 'run'}", "--run.max_steps=1",
                           "--training.global_batch_size=4", "--training.micro_batch_size=1",
                           "--run.eval_interval=0", "--run.tensorboard=false"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    lines = proc.stderr.splitlines()
    crash = [i for i, line in enumerate(lines) if line.startswith("soda-mega: rank 1 ")]
    assert len(crash) == 1, lines
    assert lines[crash[0]].startswith(
        f"soda-mega: rank 1 (local rank 1 on {socket.gethostname()}, pid "), lines[crash[0]]
    # then how rank 0 ended: its collective failed, or torchrun stopped it first
    assert ("crashed (exit 1): RuntimeError: SODA_MEGA_FAULT: rank 1 step 1: boom (its traceback "
            "is above)") in lines[crash[0]], lines[crash[0]]
    assert "RuntimeError: SODA_MEGA_FAULT: rank 1 step 1: boom" in "\n".join(lines[:crash[0]])
    assert not [line for line in lines if "torch/distributed/run.py" in line
                or "ChildFailedError" in line or "Root Cause" in line], lines
    assert lines[crash[0] + 1:] == [
        "soda-mega: training crashed (exit 1); no restarts left (MAX_RESTARTS=0)"], lines


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> list[str]:
    from soda_mega.data.write.synthetic import random_docs, write_split
    from soda_mega.tokens import VocabLayout

    root = tmp_path_factory.mktemp("corpus")
    layout = VocabLayout.from_config(load_config(preset="tiny").vocab)
    for name, kind, n in (("speech", "speech", 60), ("text", "text", 30)):
        write_split(root / name / "train", layout, random_docs(layout, n, 20, 300, 1, kind), kind)
    return [f"--data.train={root / 'speech'},{root / 'text'}"]
