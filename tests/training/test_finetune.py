"""Fine-tuning: ``training.init_from`` (weights in, everything else fresh; resume wins) and
``training.epochs``, on a small S2ST dataset with its source part masked out of the loss."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_helpers import make_tiny_checkpoint, random_full_weights, tiny_config
from launch_env import clean_env
from soda_mega.checkpoint.errors import CheckpointError
from soda_mega.checkpoint.weights import load_full_weights
from soda_mega.data.read.loader import SodaDataLoader
from soda_mega.data.schema import LENGTHS_FILE
from soda_mega.data.write.builder import build_dataset
from tolerances import REFERENCE_NLL_FP32, TRAINING_TRACE

SEQ, GBS, MBS = 128, 8, 4
EPOCHS = 0.5


def _env() -> dict:
    return clean_env()


@pytest.fixture(scope="module")
def s2st_data(tmp_path_factory) -> Path:
    """24 translation pairs as random codes (no codec): about 9k tokens, 5% held out."""
    src = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(24):
        for side, frames in (("s", 12 + i % 5), ("t", 16 + i % 7)):
            np.save(src / f"{side}{i}.npy", rng.integers(0, 2048, (8, frames)).astype(np.int16))
        lines.append(json.dumps({"id": f"p{i}", "source_codes": f"s{i}.npy", "source_text": f"hello {i}",
                                 "target_text": f"bonjour {i}", "target_codes": f"t{i}.npy"}))
    (src / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = src / "dataset"
    cfg = tiny_config("--data.build_workers=0", "--data.valid_fraction=0.05")
    build_dataset(out, [src / "pairs.jsonl"], "s2st", cfg, show_progress=False)
    return out


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("init"), 0)


def _args(data: Path, run_dir: Path, init: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", f"--data.train={data}", f"--run.dir={run_dir}",
            f"--training.init_from={init}", f"--training.epochs={EPOCHS}",
            f"--training.global_batch_size={GBS}", f"--training.micro_batch_size={MBS}",
            f"--model.seq_length={SEQ}", "--training.lr=2e-3", "--training.lr_schedule=cosine",
            "--training.adam_eps=1e-8", "--run.save_interval=2", "--run.eval_interval=0",
            "--run.log_interval=1", "--run.tensorboard=false", "--data.num_workers=0", *extra]


def _train(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "soda_mega.cli", *args], capture_output=True,
                          text=True, env=_env(), timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def _trace(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _expected_steps(data: Path) -> int:
    tokens = int(np.load(data / "train" / LENGTHS_FILE).sum())
    return math.ceil(EPOCHS * tokens / (GBS * SEQ))


@pytest.fixture(scope="module")
def finetune(s2st_data, init_ckpt, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("finetune")
    return run_dir, _train(*_args(s2st_data, run_dir, init_ckpt))


def _reference_loss(cfg, full: dict, batches: list[dict]) -> float:
    """Mean per-token loss (cross-entropy + z-loss, as the trainer logs it) over the unmasked
    labels of ``batches``, from the plain-PyTorch decoder in fp64: independent of Megatron."""
    from soda_mega.inference.decoder import SodaDecoder

    decoder = SodaDecoder(cfg, full, dtype=torch.float64).eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            logits = decoder(batch["tokens"])
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, batch["labels"][..., None])[..., 0]
            loss = lse - picked + cfg.training.z_loss * lse * lse
            mask = batch["loss_mask"].double()
            total += float((loss * mask).sum())
            count += float(mask.sum())
    return total / count


def test_first_step_runs_the_checkpoint_weights(finetune, s2st_data, init_ckpt):
    run_dir, proc = finetune
    assert f"initialised the weights from {init_ckpt}: weights-only checkpoint (test_seed 0)" in proc.stdout
    cfg = tiny_config(*_args(s2st_data, run_dir, init_ckpt)[3:])
    loader = SodaDataLoader(cfg, "train", dp_rank=0, dp_size=1, needs_data=True, num_workers=0)
    batches = [b for b, _ in zip(loader, range(GBS // MBS))]
    masked = sum(float((b["loss_mask"] == 0).sum()) for b in batches)
    assert 0 < masked < GBS * SEQ  # the source parts really are left out
    _, full = load_full_weights(init_ckpt)
    want = _reference_loss(cfg, full, batches)
    got = _trace(run_dir)[0]["loss"]
    assert got == pytest.approx(want, rel=REFERENCE_NLL_FP32)
    # Other weights give another loss, far outside the tolerance: the match means something.
    other = _reference_loss(cfg, random_full_weights(cfg, seed=1), batches)
    assert abs(other - got) > 100 * REFERENCE_NLL_FP32 * got


def test_epochs_set_the_number_of_steps(finetune, s2st_data):
    run_dir, _ = finetune
    steps = _expected_steps(s2st_data)
    assert 3 <= steps <= 4  # the fixture's size; keeps the runs short
    assert [r["step"] for r in _trace(run_dir)] == list(range(1, steps + 1))
    state = json.loads((run_dir / "checkpoints" / f"step_{steps:08d}" / "trainer_state.json").read_text())
    assert state["schedule"]["total_steps"] == steps


def test_resume_continues_the_fine_tune_not_the_initial_weights(finetune, s2st_data, tmp_path):
    run_dir, _ = finetune
    other = make_tiny_checkpoint(tmp_path / "other", 1)  # would change the loss if it were loaded
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    proc = _train(*_args(s2st_data, resumed, other))
    assert "resumed from" in proc.stdout and "is not used" in proc.stdout
    assert "initialised the weights" not in proc.stdout
    got, want = _trace(resumed), _trace(run_dir)[2:]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=TRAINING_TRACE["resume_rtol"])


@pytest.mark.parametrize("distributed", [False, True], ids=["plain", "distopt"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_optimizer_main_weights_start_at_the_loaded_weights(init_ckpt, precision, distributed):
    """After init_from, an update of size ~0 leaves the weights at the checkpoint's: the fp32
    main weights the optimizer copies back into the model are the loaded ones, not the init."""
    _, full = load_full_weights(init_ckpt)
    bf16 = precision == "bf16"
    for reload in (True, False) if bf16 else (True,):
        got = _weights_after_null_step(init_ckpt, precision, distributed, reload)
        diff = max(float((got[k] - full[k].to(got[k].dtype)).abs().max()) for k in full)
        if reload:
            assert diff == 0.0, (precision, distributed)
        else:
            # negative control: loading the model alone leaves bf16 runs' main weights at the init
            assert diff > 0.1


def _weights_after_null_step(init_ckpt: Path, precision: str, distributed: bool,
                             reload: bool) -> dict[str, torch.Tensor]:
    from soda_mega.checkpoint.load import load_checkpoint
    from soda_mega.checkpoint.weights import _OneProcess
    from soda_mega.model.gpt import build_model
    from soda_mega.training.forward_backward import wrap_ddp
    from soda_mega.training.optimizer import build_optimizer, set_hyperparameters
    from soda_mega.training.trainer import load_initial_weights

    cfg = tiny_config(f"--training.precision={precision}", f"--parallel.distributed_optimizer={distributed}",
                      "--parallel.overlap_grad_reduce=false", "--training.seed=7")
    with _OneProcess(cfg.training.seed):
        model = wrap_ddp(build_model(cfg), cfg)
        optimizer = build_optimizer(model, cfg, peak_lr=1e-3)
        if reload:
            load_initial_weights(str(init_ckpt), cfg, model, optimizer)
        else:
            load_checkpoint(init_ckpt, model, optimizer=None, restore_rng=False)
        set_hyperparameters(optimizer, 1e-30, 0.0)
        for chunk in model:
            chunk.zero_grad_buffer()
        assert optimizer.step()[0]
        return {k: v.detach().clone() for k, v in model[0].module.state_dict().items()
                if not k.endswith("_extra_state")}


def test_init_from_another_model_is_refused_naming_the_field(init_ckpt, tmp_path):
    from soda_mega.training.trainer import load_initial_weights

    small = make_tiny_checkpoint(tmp_path / "small", 0, "--model.num_layers=2", "--vocab.num_codebooks=4")
    with pytest.raises(CheckpointError) as err:
        load_initial_weights(str(small), tiny_config(), model=None, optimizer=None)
    assert "model.num_layers: 4 != 2" in str(err.value) and "vocab.num_codebooks: 8 != 4" in str(err.value)
    assert "training.init_from=" in str(err.value)


def test_a_longer_or_shorter_context_is_the_same_model(init_ckpt):
    """SODA fine-tunes at 2048 tokens a model pretrained at 4096: seq_length shapes no weight."""
    got = _weights_after_seq_length(init_ckpt, 64)
    _, full = load_full_weights(init_ckpt)
    assert all(torch.equal(got[k], full[k]) for k in full)


def _weights_after_seq_length(init_ckpt: Path, seq_length: int) -> dict[str, torch.Tensor]:
    from soda_mega.checkpoint.weights import _OneProcess
    from soda_mega.model.gpt import build_model
    from soda_mega.training.forward_backward import wrap_ddp
    from soda_mega.training.optimizer import build_optimizer
    from soda_mega.training.trainer import load_initial_weights

    cfg = tiny_config(f"--model.seq_length={seq_length}", "--parallel.overlap_grad_reduce=false")
    with _OneProcess(cfg.training.seed):
        model = wrap_ddp(build_model(cfg), cfg)
        load_initial_weights(str(init_ckpt), cfg, model, build_optimizer(model, cfg, peak_lr=1e-3))
        return {k: v.detach().clone() for k, v in model[0].module.state_dict().items()
                if not k.endswith("_extra_state")}


def test_total_steps_from_epochs_is_exact():
    from soda_mega.training.trainer import total_steps

    cfg = tiny_config("--training.epochs=5", f"--training.global_batch_size={GBS}")
    per_step = GBS * cfg.model.seq_length
    assert total_steps(cfg, train_tokens=2 * per_step) == 10
    assert total_steps(cfg, train_tokens=2 * per_step + 1) == 11
    assert total_steps(tiny_config("--training.epochs=0.1"), train_tokens=3) == 1
    assert total_steps(tiny_config("--training.train_tokens=4096")) == math.ceil(4096 / per_step)


def test_launcher_configs_hold_the_soda_s2st_recipe():
    from soda_mega.config import load_config

    configs = Path(__file__).resolve().parents[2] / "launchers" / "configs"
    full = load_config(configs / "s2st-finetune.yaml")
    tiny = load_config(configs / "s2st-tiny-demo.yaml")
    assert (full.training.global_batch_size, full.model.seq_length) == (64, 2048)
    assert full.model.name == "soda-1.7b" and tiny.model.name == "tiny"
    for cfg in (full, tiny):
        t = cfg.training
        assert (t.lr, t.lr_schedule, t.min_lr, t.epochs, t.init_from) == (2e-5, "cosine", 0.0, 5.0, None)
        # a pair is never cut from its source, and attends only to itself
        assert (cfg.data.packing, cfg.data.reset_at_document) == ("whole", True)
