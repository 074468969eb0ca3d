"""The ``tiny`` model gives the same loss, statistics and gradients with every kernels setting."""

from __future__ import annotations

import pytest
import torch

from soda_mega.config import load_config
from soda_mega.tokens import LOSS_GROUPS, VocabLayout
from tolerances import KERNEL_REORDER_FP32, PARALLEL_FP32

SMALL = ["--vocab.codebook_size=16", "--model.seq_length=32"]
LOSSES = ("megatron", "torch", "triton")
EMBEDDINGS = ("torch", "triton")


def _batch(cfg, b=2, s=32, seed=0):
    layout = VocabLayout.from_config(cfg.vocab)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, layout.size, (b, s + 1), generator=g)
    return {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
            "loss_mask": (torch.rand(b, s, generator=g) > 0.2).float(),
            "position_ids": torch.arange(s).expand(b, s).contiguous()}


def _run(loss: str, embedding: str, z_loss: float):
    from soda_mega.model.gpt import build_model

    cfg = load_config(preset="tiny", overrides=[*SMALL, f"--kernels.loss={loss}",
                                                f"--kernels.embedding={embedding}",
                                                f"--training.z_loss={z_loss}"])
    (model,) = build_model(cfg)
    batch = _batch(cfg)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                loss_mask=batch["loss_mask"])
    mask = batch["loss_mask"]
    mean = (out.token_loss * mask).sum() / mask.sum()
    mean.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out, mean.detach(), grads


# Every (loss, embedding) pair with a large z-loss (so a wrong z-term shows), and each loss
# path without z-loss.
SETTINGS = [(loss, emb, 0.1) for loss in LOSSES for emb in EMBEDDINGS]
SETTINGS += [(loss, "torch", 0.0) for loss in LOSSES]


@pytest.fixture(scope="module")
def runs(megatron_one_process):
    return {setting: _run(*setting) for setting in SETTINGS}


@pytest.mark.parametrize("loss, embedding, z_loss", SETTINGS)
def test_loss_and_gradients_agree_across_kernels(runs, loss, embedding, z_loss):
    ref_out, ref_mean, ref_grads = runs[("megatron", "torch", z_loss)]
    out, mean, grads = runs[(loss, embedding, z_loss)]
    assert mean == pytest.approx(float(ref_mean), rel=PARALLEL_FP32["loss_rtol"])
    torch.testing.assert_close(out.token_loss, ref_out.token_loss, **KERNEL_REORDER_FP32)
    torch.testing.assert_close(out.group_loss, ref_out.group_loss, rtol=1e-5, atol=1e-4)
    assert torch.equal(out.group_tokens, ref_out.group_tokens)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        err = float((grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max())
        assert err <= PARALLEL_FP32["grad_rel"], f"{name}: {err:.2e}"


def test_z_loss_is_applied_in_every_path(runs):
    for loss in LOSSES:
        with_z, without = runs[(loss, "torch", 0.1)][1], runs[(loss, "torch", 0.0)][1]
        assert float(with_z - without) > 0.5, loss  # 0.1 * lse^2 with lse ~ ln(448) ~ 6


def test_statistics_cover_every_counted_token(runs):
    out, _, _ = runs[("triton", "triton", 0.1)]
    cfg = load_config(preset="tiny", overrides=SMALL)
    batch = _batch(cfg)
    layout = VocabLayout.from_config(cfg.vocab)
    groups = layout.loss_group(batch["labels"])
    counted = batch["loss_mask"] != 0
    for g in range(len(LOSS_GROUPS)):
        sel = counted & (groups == g)
        assert int(out.group_tokens[g]) == int(sel.sum())
        torch.testing.assert_close(out.group_loss[g], out.token_loss[sel].sum())
    assert (out.token_loss[~counted] == 0).all()


@pytest.mark.parametrize("loss", ["megatron", "triton"])
def test_schedule_reports_per_modality_losses(megatron_one_process, loss):
    from soda_mega.model.gpt import build_model
    from soda_mega.training.forward_backward import forward_backward, wrap_ddp

    cfg = load_config(preset="tiny", overrides=[*SMALL, f"--kernels.loss={loss}"])
    model = wrap_ddp(build_model(cfg), cfg)
    batches = [_batch(cfg, seed=s) for s in range(2)]
    result = forward_backward(model, batches, 2, 32, 2)
    assert set(result.groups) == set(LOSS_GROUPS)
    assert sum(c for _, c in result.groups.values()) == result.num_tokens
    assert sum(s for s, _ in result.groups.values()) == pytest.approx(result.loss_sum, rel=1e-6)
    assert all(c > 0 for _, c in result.groups.values())


def test_kernel_choices_resolve(monkeypatch):
    from soda_mega.config.fields import ConfigError
    from soda_mega.model.lm_head import resolve_impl

    assert resolve_impl("embedding", "megatron") == "torch"
    if not torch.cuda.is_available():
        assert resolve_impl("loss", "auto") == "megatron"
        assert resolve_impl("embedding", "auto") == "torch"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ConfigError, match="kernels.loss: triton needs a CUDA GPU"):
            resolve_impl("loss", "triton")
    with pytest.raises(ConfigError, match="kernels.loss"):
        load_config(preset="tiny", overrides=["--kernels.loss=liger"])


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap_grad_reduce"])
def test_four_micro_batches_accumulate_in_main_grad(megatron_one_process, overlap):
    """Megatron DDP, 4 micro-batches: the fused losses compute the output layer's gradient in
    the forward with three matmuls (the schedule's per-token sums make the downstream gradient
    known) and add it straight into its fp32 main_grad; DDP still sees the weight ready in the
    backward (with overlap_grad_reduce it asserts a .grad and starts the bucket there); every
    main_grad equals the megatron-loss run's."""
    from soda_kernels.fused_linear_cross_entropy import WORK, row_multiple
    from soda_mega.model.gpt import build_model
    from soda_mega.training.forward_backward import forward_backward, wrap_ddp

    grads = {}
    for loss in ("megatron", "triton", "torch"):
        cfg = load_config(preset="tiny", overrides=[
            *SMALL, f"--kernels.loss={loss}", "--training.z_loss=1e-2",
            f"--parallel.overlap_grad_reduce={str(overlap).lower()}"])
        model = wrap_ddp(build_model(cfg), cfg)
        batches = [_batch(cfg, seed=s) for s in range(4)]
        WORK.reset()
        forward_backward(model, batches, 4, 32, 2)
        module = model[0].module
        weight = module.output_layer.weight
        assert weight.grad is None and module.known_loss_grad_scale is None
        assert weight.grad_added_to_main_grad == (loss != "megatron")
        if loss != "megatron":  # 3 matmuls (in row chunks) per micro-batch, no recompute
            pad = row_multiple(weight.device, loss)
            rows = sum(int((b["loss_mask"] != 0).sum()) for b in batches)
            rows += sum(-int((b["loss_mask"] != 0).sum()) % pad for b in batches)
            flops = {}
            for name, m, n, k in WORK.calls:
                flops[name] = flops.get(name, 0) + 2 * m * n * k
            size = VocabLayout.from_config(cfg.vocab).size
            each = 2 * rows * cfg.model.hidden_size * size
            assert flops == {"logits": each, "grad_hidden": each, "grad_weight": each}, flops
        grads[loss] = {n: p.main_grad.detach().clone() for n, p in module.named_parameters()}
    for loss in ("triton", "torch"):
        assert grads[loss].keys() == grads["megatron"].keys()
        for name, grad in grads[loss].items():
            ref = grads["megatron"][name]
            err = float((grad - ref).abs().max() / ref.abs().max())
            assert err <= PARALLEL_FP32["grad_rel"], f"{loss} {name}: {err:.2e}"
