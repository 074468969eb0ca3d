"""AdamW through Megatron-core's optimizer stack, with SODA's cautious variant as an option.

Megatron-core provides the mixed-precision machinery: fp32 master weights for bf16 models, the
distributed optimizer (optimizer state sharded over data-parallel ranks), global-norm gradient
clipping, and no weight decay for 1-D parameters (RMSNorm weights). The update rule inside is a
torch optimizer: ``torch.optim.AdamW`` (or apex/TE fused Adam when installed), or with
``training.cautious`` the :class:`CautiousAdamW` below.

Cautious AdamW (Liang et al., 2024; the variant SODA trained with): compute the Adam update
``u = m_hat / (sqrt(v_hat) + eps)``, zero the components whose sign disagrees with the current
gradient, and rescale the survivors by ``numel / (kept + 1)`` so the update keeps its size;
decoupled weight decay is applied as in AdamW. NOTE: with the distributed optimizer each rank
holds a contiguous shard of the flattened parameters, and the rescaling uses that shard's mask.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from soda_mega.config.schema import SodaConfig
from soda_mega.parallel import cpu_shims


class CautiousAdamW(torch.optim.Optimizer):
    """AdamW whose update components that disagree in sign with the gradient are masked."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step = float(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (exp_avg / (1 - beta1 ** step)) / (
                    (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(eps))
                mask = (update * grad > 0).to(update.dtype)
                mask.mul_(mask.numel() / (mask.sum() + 1))
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_((update * mask).to(p.dtype), alpha=-lr)
        return loss


def optimizer_config(cfg: SodaConfig, peak_lr: float) -> OptimizerConfig:
    t = cfg.training
    bf16 = t.precision == "bf16"
    return OptimizerConfig(
        optimizer="adam",
        lr=peak_lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )


def inner_optimizers(optimizer) -> list:
    """The Megatron optimizers inside a (possibly chained) Megatron optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def build_optimizer(model_chunks, cfg: SodaConfig, peak_lr: float):
    """Megatron optimizer over the DDP-wrapped chunks; AdamW or cautious AdamW inside."""
    with cpu_shims.cuda_type_names():
        optimizer = get_megatron_optimizer(optimizer_config(cfg, peak_lr), list(model_chunks))
    if cfg.training.cautious:
        t = cfg.training
        for opt in inner_optimizers(optimizer):
            cautious = CautiousAdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak_lr,
                                     betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                     weight_decay=t.weight_decay)
            # NOTE: take over Megatron's groups as they are: the distributed optimizer has
            # already swapped in its fp32 shards, which are views and would fail the leaf
            # check of a fresh torch optimizer.
            cautious.param_groups = opt.optimizer.param_groups
            opt.optimizer = cautious
    set_hyperparameters(optimizer, peak_lr, cfg.training.weight_decay)
    return optimizer


def set_hyperparameters(optimizer, lr: float, weight_decay: float) -> None:
    """Set every parameter group's rate and decay, honouring Megatron's per-group multipliers.

    NOTE: Megatron puts 1-D parameters (RMSNorm weights) in a group with ``wd_mult=0`` but the
    group's ``weight_decay`` starts at the configured value; Megatron-LM's scheduler applies
    the multiplier every step. Without it the norms would be decayed, so this must run before
    every step (the trainer does), and once at build time.
    """
    for opt in inner_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
