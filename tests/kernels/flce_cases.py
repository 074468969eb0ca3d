"""Inputs and error measures shared by the fused linear cross-entropy tests and the TP worker."""

from __future__ import annotations

import torch

from soda_kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)


def make_case(n: int, h: int, v: int, seed: int = 0, dtype=torch.float32, device="cpu",
              n_real: int | None = None, mask_fraction: float = 0.2, scale: float = 1.0):
    """Random hidden [n, h], weight [v, h], labels in the real range, mask and groups (-1..2)."""
    g = torch.Generator().manual_seed(seed)
    n_real = v if n_real is None else n_real
    hidden = torch.randn(n, h, generator=g)
    # std 1/sqrt(h) * scale gives logits of std ~scale: a realistic, non-flat softmax.
    weight = torch.randn(v, h, generator=g) * (scale / h ** 0.5)
    labels = torch.randint(0, n_real, (n,), generator=g)
    mask = (torch.rand(n, generator=g) >= mask_fraction).float()
    groups = torch.randint(-1, 3, (n,), generator=g)
    return {"hidden": hidden.to(dtype).to(device), "weight": weight.to(dtype).to(device),
            "labels": labels.to(device), "loss_mask": mask.to(device),
            "loss_groups": groups.to(device), "n_real": n_real}


def run(fn, case: dict, grad_seed: int = 1, **kwargs):
    """Forward + backward of ``fn`` with a random upstream gradient; returns detached results."""
    hidden = case["hidden"].detach().clone().requires_grad_()
    weight = case["weight"].detach().clone().requires_grad_()
    out = fn(hidden, weight, case["labels"], case["loss_mask"], case["loss_groups"],
             num_real_vocab=case["n_real"], **kwargs)
    g = torch.Generator().manual_seed(grad_seed)
    upstream = torch.rand(hidden.shape[0], generator=g).to(out.loss.device, out.loss.dtype)
    (out.loss * upstream).sum().backward()
    return {"loss": out.loss.detach(), "lse": out.lse.detach(), "group_loss": out.group_loss,
            "group_tokens": out.group_tokens, "grad_hidden": hidden.grad, "grad_weight": weight.grad}


def run_train(case, impl, known, upstream=None, **kwargs):
    """The training path: forward told ``known_grad=known``, backward of ``loss * upstream``
    (default: ``known``, the announced gradient); returns detached results like :func:`run`."""
    hidden = case["hidden"].detach().clone().requires_grad_()
    weight = case["weight"].detach().clone().requires_grad_()
    out = fused_linear_cross_entropy(hidden, weight, case["labels"], case["loss_mask"],
                                     case["loss_groups"], num_real_vocab=case["n_real"],
                                     impl=impl, known_grad=known, **kwargs)
    up = known if upstream is None else upstream
    (out.loss * up.to(out.loss.dtype)).sum().backward()
    return {"loss": out.loss.detach(), "lse": out.lse.detach(), "group_loss": out.group_loss,
            "group_tokens": out.group_tokens, "grad_hidden": hidden.grad, "grad_weight": weight.grad}


def upstream_of(n: int, device="cpu", seed: int = 1) -> torch.Tensor:
    """The random upstream gradient :func:`run` uses for ``grad_seed=seed``."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)).to(device)


def run_fused(case, impl="triton", **kwargs):
    return run(fused_linear_cross_entropy, case, impl=impl, **kwargs)


def run_reference(case, dtype=torch.float64, **kwargs):
    """Reference on the case's inputs (in their own precision) computed in ``dtype``."""
    return run(fused_linear_cross_entropy_reference, case, compute_dtype=dtype, **kwargs)


def errors(result: dict, oracle: dict) -> dict:
    """Max abs error of the loss, and max abs error / max |oracle| of each gradient."""
    out = {"loss": float((result["loss"].double() - oracle["loss"].double()).abs().max())}
    for key in ("grad_hidden", "grad_weight"):
        ref = oracle[key].double()
        out[key] = float((result[key].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return out
