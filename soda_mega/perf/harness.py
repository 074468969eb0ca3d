"""The real training step, set up for measurement.

Benchmarks and the profiler time :meth:`soda_mega.training.trainer.Trainer.train_step`
itself (Megatron-core schedules, DDP, the guarded optimizer update), never a re-implementation
of it. This module supplies what a measurement needs around it:

* a synthetic SODA-shaped corpus (:mod:`soda_mega.data.write.synthetic`) when the configuration
  names no datasets: speech documents of audio ids and 5% text documents, so the loader,
  packing and per-modality loss bookkeeping run as in training;
* run settings that keep side work out of the timed region (no validation, checkpoints,
  TensorBoard or loader workers);
* the micro-batches of a few steps, fetched and moved to the GPU before timing, so neither the
  loader nor the host-to-device copy is timed (the trainer's own loop overlaps them with
  compute through loader workers).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from soda_mega.config.loader import apply_mapping, parse_overrides
from soda_mega.config.schema import SodaConfig
from soda_mega.data.write.synthetic import random_docs, write_split
from soda_mega.tokens import VocabLayout

#: Settings of every measured run: nothing but training steps.
MEASUREMENT_OVERRIDES = ("--data.num_workers=0", "--run.eval_interval=0", "--run.save_interval=0",
                         "--run.tensorboard=false", "--run.resume=false")


def with_overrides(cfg: SodaConfig, overrides: Iterable[str]) -> SodaConfig:
    """A validated copy of ``cfg`` with ``--section.key=value`` overrides applied."""
    out = SodaConfig()
    apply_mapping(out, cfg.to_dict(), "base configuration")
    apply_mapping(out, parse_overrides(overrides), "measurement settings")
    return out.validate()


def synthetic_corpus(root: Path, cfg: SodaConfig, min_tokens: int, seed: int = 0) -> list[str]:
    """Write a speech and a text dataset of at least ``min_tokens`` tokens; return the roots.

    Documents are ``BOS body EOS`` with uniformly random ids (audio ids for speech, byte ids for
    text), 95% / 5% of the tokens, as SODA mixes them. Throughput does not depend on the ids.
    """
    layout = VocabLayout.from_config(cfg.vocab)
    root = Path(root)
    speech_len, text_len = (200, 4000), (100, 2000)
    n_speech = max(8, int(0.95 * min_tokens / (sum(speech_len) / 2)) + 1)
    n_text = max(4, int(0.05 * min_tokens / (sum(text_len) / 2)) + 1)
    write_split(root / "speech" / "train", layout,
                random_docs(layout, n_speech, *speech_len, seed, "speech"), "speech",
                size_limit=1 << 26)
    write_split(root / "text" / "train", layout,
                random_docs(layout, n_text, *text_len, seed + 1, "text"), "text", size_limit=1 << 26)
    return [str(root / "speech"), str(root / "text")]


def measurement_config(cfg: SodaConfig, run_dir: Path, data: Sequence[str] = (),
                       extra: Iterable[str] = ()) -> SodaConfig:
    """``cfg`` with the measurement settings, ``run.dir`` and (if given) the datasets."""
    overrides = list(MEASUREMENT_OVERRIDES) + [f"--run.dir={run_dir}"]
    if data:
        overrides.append(f"--data.train={','.join(data)}")
    return with_overrides(cfg, overrides + list(extra))


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def to_device(batch, dev: torch.device):
    """A micro-batch (dict of tensors, or None on middle pipeline stages) on ``dev``."""
    if batch is None:
        return None
    # NOTE: the loader yields CPU tensors and Trainer.train_step passes them to the model as
    # they are; on a GPU the model's weights are on the device, so the batch must be too.
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_trainer(cfg: SodaConfig):
    from soda_mega.training.trainer import Trainer

    return Trainer(cfg)


def fetch_steps(trainer, steps: int) -> list[list]:
    """The micro-batches of ``steps`` optimizer steps, already on the training device."""
    dev = device()
    data = iter(trainer.loader)
    out = [[to_device(next(data), dev) for _ in range(trainer.micro_per_step)]
           for _ in range(steps)]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return out


def run_steps(trainer, batch_sets: Sequence[list], steps: int) -> list[dict]:
    """``steps`` calls of ``trainer.train_step``, cycling through ``batch_sets``; the records.

    ``train_step`` times itself (host clock, device synchronised at its end) and returns
    ``step_seconds`` and the throughput derived from it.
    """
    return [trainer.train_step(batch_sets[i % len(batch_sets)]) for i in range(steps)]


def release(trainer) -> None:
    """Free a trainer's model and optimizer state.

    The process group and Megatron's parallel groups stay: the next Trainer re-creates the
    groups for its own layout, and a caller's groups (a test session's) are left working.
    """
    if getattr(trainer, "telemetry", None) is not None:
        trainer.telemetry.close()
    trainer.sink.close()
    for attr in ("model", "optimizer", "loader"):
        if hasattr(trainer, attr):
            setattr(trainer, attr, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
