"""Small soda-mega checkpoints for tests: the tiny preset with seeded random weights.

``save_full_weights`` writes them in the weights-only format that ``soda-mega import hf``
produces; they load like any training checkpoint (any layout, eval, export, init_from).
"""

from __future__ import annotations

from pathlib import Path

import torch

from soda_mega.config import load_config
from soda_mega.config.schema import SodaConfig


def tiny_config(*overrides: str) -> SodaConfig:
    return load_config(preset="tiny", overrides=overrides)


def random_full_weights(cfg: SodaConfig, seed: int = 0, std: float = 0.5) -> dict[str, torch.Tensor]:
    """Full weights (global names, padded vocabulary) with large random values, so that the
    model's predictions are far from uniform and comparisons are not trivially satisfied."""
    from soda_mega.checkpoint.weights import _OneProcess, single_process_config
    from soda_mega.model.gpt import build_model

    with _OneProcess(cfg.training.seed):
        model = build_model(single_process_config(cfg))[0]
        names = {k: tuple(v.shape) for k, v in model.state_dict().items()
                 if not k.endswith("_extra_state")}
    gen = torch.Generator().manual_seed(seed)
    full = {}
    for name, shape in names.items():
        if len(shape) == 1:  # norm weights: around 1
            full[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            full[name] = std * torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    return full


def make_tiny_checkpoint(root: str | Path, seed: int = 0, *overrides: str) -> Path:
    """A weights-only tiny checkpoint under ``root``; returns its ``step_N`` folder."""
    from soda_mega.checkpoint.weights import save_full_weights

    cfg = tiny_config(*overrides)
    return save_full_weights(root, cfg, random_full_weights(cfg, seed), {"test_seed": seed})
