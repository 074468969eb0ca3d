"""Optimizers through Megatron-core against plain reference computations."""

from __future__ import annotations

import pytest
import torch

from soda_mega.config import load_config
from soda_mega.training.optimizer import CautiousAdamW, build_optimizer, inner_optimizers

SMALL = ["--vocab.codebook_size=16", "--model.seq_length=16", "--training.adam_beta1=0.9",
         "--training.adam_beta2=0.95", "--training.adam_eps=1e-8", "--training.weight_decay=0.1",
         "--training.clip_grad=0", "--parallel.overlap_grad_reduce=false"]


def _adamw_reference(p, grads, lr, betas, eps, wd, cautious=False):
    """Textbook AdamW (Loshchilov & Hutter), one tensor, fp64; ``cautious`` masks the update
    components whose sign disagrees with the gradient and rescales the rest (Liang et al.)."""
    p = p.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        update = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        if cautious:
            mask = (update * g > 0).double()
            update = update * mask * (mask.numel() / (mask.sum() + 1))
        p = p * (1 - lr * wd) - lr * update
    return p


def test_cautious_adamw_matches_reference():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(50, generator=g)
    grads = [torch.randn(50, generator=g) for _ in range(4)]
    p = torch.nn.Parameter(p0.clone())
    opt = CautiousAdamW([p], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    expected = _adamw_reference(p0, grads, 0.01, (0.9, 0.95), 1e-8, 0.1, cautious=True)
    torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=1e-5)
    # And it really differs from plain AdamW on the same inputs.
    assert not torch.allclose(expected, _adamw_reference(p0, grads, 0.01, (0.9, 0.95), 1e-8, 0.1))


@pytest.mark.parametrize("cautious", [False, True])
@pytest.mark.parametrize("distributed", [False, True])
def test_megatron_optimizer_matches_reference(megatron_one_process, cautious, distributed):
    """Two steps through Megatron's (distributed) optimizer == the textbook update, and the
    RMSNorm weights get no weight decay."""
    from soda_mega.model.gpt import build_model
    from soda_mega.training.forward_backward import wrap_ddp

    cfg = load_config(preset="tiny", overrides=[*SMALL, f"--training.cautious={cautious}",
                                                f"--parallel.distributed_optimizer={distributed}"])
    model = wrap_ddp(build_model(cfg), cfg)
    optimizer = build_optimizer(model, cfg, peak_lr=0.01)
    params = dict(model[0].module.named_parameters())
    names = ["decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.input_layernorm.weight"]
    start = {n: params[n].detach().clone() for n in names}
    g = torch.Generator().manual_seed(1)
    grads = {n: [torch.randn(params[n].shape, generator=g) * 1e-2 for _ in range(2)] for n in names}
    for step in range(2):
        model[0].zero_grad_buffer()
        for n, p in params.items():
            p.main_grad.copy_(grads[n][step] if n in grads else torch.zeros_like(p))
        ok, _, _ = optimizer.step()
        assert ok
    for n in names:
        wd = 0.0 if n.endswith("norm.weight") else 0.1
        expected = _adamw_reference(start[n].flatten(), [x.flatten() for x in grads[n]], 0.01,
                                    (0.9, 0.95), 1e-8, wd, cautious=cautious)
        torch.testing.assert_close(params[n].detach().flatten().double(), expected, atol=1e-6, rtol=1e-5)
    groups = [grp for opt in inner_optimizers(optimizer) for grp in opt.optimizer.param_groups]
    assert {grp["weight_decay"] for grp in groups} == {0.0, 0.1}
