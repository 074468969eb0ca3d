"""Activation recomputation gives the same loss and gradients; bf16 runs with fp32 masters."""

from __future__ import annotations

import pytest
import torch

from soda_mega.config import load_config
from soda_mega.tokens import VocabLayout

SMALL = ["--vocab.codebook_size=16", "--model.seq_length=32", "--parallel.overlap_grad_reduce=false"]


def _step(overrides):
    from soda_mega.model.gpt import build_model
    from soda_mega.training.forward_backward import forward_backward, wrap_ddp

    cfg = load_config(preset="tiny", overrides=[*SMALL, *overrides])
    model = wrap_ddp(build_model(cfg), cfg)
    layout = VocabLayout.from_config(cfg.vocab)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, layout.size, (2, 33), generator=g)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(2, 32),
             "position_ids": torch.arange(32).expand(2, 32)}
    result = forward_backward(model, [batch], 1, 32, 2)
    grads = {n: p.main_grad.clone() for n, p in model[0].module.named_parameters()}
    return cfg, model, result, grads


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_matches_no_recompute(megatron_one_process, mode):
    _, _, base, base_grads = _step([])
    _, _, got, grads = _step([f"--training.recompute={mode}"])
    assert got.loss == pytest.approx(base.loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, base_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_step_keeps_fp32_master_weights(megatron_one_process):
    from soda_mega.training.optimizer import build_optimizer, inner_optimizers

    cfg, model, result, _ = _step(["--training.precision=bf16"])
    assert all(p.dtype == torch.bfloat16 for p in model[0].module.parameters())
    assert all(p.main_grad.dtype == torch.float32 for p in model[0].module.parameters())
    optimizer = build_optimizer(model, cfg, peak_lr=1e-3)
    masters = [p for opt in inner_optimizers(optimizer) for g in opt.optimizer.param_groups
               for p in g["params"]]
    assert masters and all(p.dtype == torch.float32 for p in masters)
    before = model[0].module.output_layer.weight.detach().clone()
    ok, grad_norm, _ = optimizer.step()
    assert ok and torch.isfinite(torch.tensor(grad_norm))
    assert torch.isfinite(torch.tensor(result.loss))
    assert not torch.equal(before, model[0].module.output_layer.weight)
