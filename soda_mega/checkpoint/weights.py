"""Checkpoints as whole-model weights: read any TP / PP layout into one process, write one back.

Evaluation, generation and the HuggingFace export work on the *full* weights of a model (one
tensor per parameter, global Megatron names, padded vocabulary rows included). They come from
a training checkpoint of any layout by loading it into a TP=1, PP=1 model in this process:
``dist_checkpointing`` reshards on load (the same path a TP=2 run resumed on one GPU takes).

Accepted checkpoint paths: see :func:`soda_mega.checkpoint.layout.resolve_checkpoint`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from soda_mega.checkpoint.errors import CheckpointError
from soda_mega.checkpoint.layout import LATEST, checkpoint_config, resolve_checkpoint
from soda_mega.checkpoint.load import load_checkpoint
from soda_mega.checkpoint.save import save_checkpoint
from soda_mega.config.schema import ParallelConfig, SodaConfig


def single_process_config(cfg: SodaConfig) -> SodaConfig:
    """``cfg`` for one process: TP = PP = 1, plain torch embedding and loss."""
    return replace(cfg, parallel=ParallelConfig(distributed_optimizer=False, overlap_grad_reduce=False),
                   kernels=replace(cfg.kernels, loss="megatron", embedding="torch")).validate()


def check_same_model(cfg: SodaConfig, expected: SodaConfig, what: str) -> None:
    """Refuse ``cfg`` unless its model shape and vocabulary equal ``expected``'s."""
    diffs = []
    for section in ("model", "vocab"):
        a, b = getattr(cfg, section).__dict__, getattr(expected, section).__dict__
        for key, value in b.items():
            if key != "name" and a.get(key) != value:
                diffs.append(f"{section}.{key}: {a.get(key)!r} != {value!r}")
    if diffs:
        raise CheckpointError(f"{what} is another model: " + "; ".join(diffs))


class _OneProcess:
    """Megatron parallel state for TP = PP = DP = 1 over a world of one, for the block only.

    A process group made here is destroyed on exit; Megatron groups that existed before
    (a caller already set up TP = PP = 1, as the test session does) are rebuilt as they were.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self):
        from megatron.core import parallel_state as ps

        from soda_mega.parallel import state

        if dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError("whole-model weights are gathered in a single process; run this "
                               "command without torchrun")
        self.owned = not dist.is_initialized()
        self.previous = state.current_layout() if ps.model_parallel_is_initialized() else None
        self.rng = torch.get_rng_state()  # initialize() reseeds; the caller's stream is kept
        state.initialize(ParallelConfig(), self.seed)
        return self

    def __exit__(self, *exc) -> None:
        from megatron.core import parallel_state as ps

        from soda_mega.parallel import state

        state.shutdown(keep_process_group=not self.owned)
        torch.set_rng_state(self.rng)
        if self.previous is not None and not self.owned:
            ps.initialize_model_parallel(
                tensor_model_parallel_size=self.previous.tp,
                pipeline_model_parallel_size=self.previous.pp,
                virtual_pipeline_model_parallel_size=self.previous.vp)


def load_full_weights(path: str | os.PathLike) -> tuple[SodaConfig, dict[str, torch.Tensor]]:
    """(configuration, fp32 full weights by global name) of a checkpoint of any layout."""
    from soda_mega.model.gpt import build_model

    step = resolve_checkpoint(path)
    cfg = checkpoint_config(step)
    one = single_process_config(cfg)
    with _OneProcess(cfg.training.seed):
        chunks = build_model(one)
        load_checkpoint(step, chunks, restore_rng=False)
        full = {k: v.detach().float().clone() for k, v in chunks[0].state_dict().items()
                if not k.endswith("_extra_state")}
    return cfg, full


def save_full_weights(root: str | os.PathLike, cfg: SodaConfig, full: dict[str, torch.Tensor],
                      provenance: dict | None = None) -> Path:
    """Write ``full`` as a weights-only soda-mega checkpoint ``root/step_00000000``.

    The result loads into any TP / PP layout (``training.init_from``, ``soda-mega eval``,
    ``soda-mega export hf``). Missing or extra tensors and shape mismatches are named.
    """
    from soda_mega.model.gpt import build_model

    root = Path(root)
    if root.is_dir() and any(p.name == LATEST or p.name.startswith("step_") for p in root.iterdir()):
        raise CheckpointError(f"{root} already holds checkpoints; write into an empty or new folder")
    one = single_process_config(cfg)
    with _OneProcess(cfg.training.seed):
        chunks = build_model(one)
        model = chunks[0]
        expected = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        missing = sorted(set(expected) - set(full))
        extra = sorted(set(full) - set(expected))
        if missing or extra:
            raise CheckpointError(f"weights do not fit the model: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}")
        bad = [f"{k}: {tuple(full[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
               if tuple(full[k].shape) != tuple(v.shape)]
        if bad:
            raise CheckpointError("weights do not fit the model: " + "; ".join(bad[:5]))
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(full[name].to(tensor.dtype))
        trainer_state = {"step": 0, "tokens": 0, "weights_only": True,
                         "provenance": provenance or {}, "config": cfg.to_dict()}
        return save_checkpoint(root, 0, chunks, None, trainer_state, keep_last=1)
