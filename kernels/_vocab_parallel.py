"""Shared pieces of the vocabulary-parallel kernels: process groups, collectives, LSE merging.

Both fused ops (:mod:`.fused_linear_cross_entropy`, :mod:`.interleaved_embedding`) run on the
vocabulary shard ``[V_local, H]`` of one tensor-parallel (TP) rank and combine per-row partial
results across the TP group. This module holds what they share:

* a process-group registry: ``torch.library`` custom ops only take tensors, numbers and
  strings, so a group travels through an op as its ``group_name`` string and is looked up here
  (registered by the public functions before they call the op);
* the online-logsumexp merge of partial statistics ``(max m, sum-exp s, target logit t)``,
  used both to merge the vocabulary splits of one rank and to merge the ranks of a TP group
  (the same algebra as Megatron's ``vocab_parallel_cross_entropy``, whose three all-reduces
  become one MAX and one SUM of a stacked ``[2, N]`` tensor);
* tiny differentiable collectives for the plain-PyTorch references, with Megatron's
  semantics (the loss is replicated on every TP rank, so a forward all-reduce has an identity
  backward, and an identity forward of a replicated input has an all-reduce backward);
* the check that Triton kernels get tensors they can run on.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

_GROUPS: dict[str, dist.ProcessGroup] = {}


def register_group(group: dist.ProcessGroup | None) -> str:
    """Name under which a custom op finds ``group``; "" means no group (one rank)."""
    if group is None or dist.get_world_size(group) == 1:
        return ""
    name = group.group_name
    _GROUPS[name] = group
    return name


def resolve_group(name: str) -> dist.ProcessGroup | None:
    if not name:
        return None
    try:
        return _GROUPS[name]
    except KeyError:
        raise RuntimeError(
            f"process group {name!r} was not registered; call the public soda_kernels function "
            "(which registers the group) rather than the raw torch.ops entry"
        ) from None


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# --------------------------------------------------------------------------- LSE merging
def merge_partials(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, dim: int = 0):
    """Merge partial softmax statistics along ``dim``.

    Each slice holds, per row, ``m = max_v x_v``, ``s = sum_v exp(x_v - m)`` and the target
    logit ``t`` (0 where the target is not in that slice) over a disjoint set of columns. An
    empty slice has ``m = -inf, s = 0``. Returns the merged ``(m, s, t)``; rows whose slices
    are all empty keep ``m = -inf, s = 0`` (never NaN).
    """
    big = m.amax(dim)
    safe = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    scaled = s * torch.exp(m - safe.unsqueeze(dim))
    return big, scaled.sum(dim), t.sum(dim)


def combine_across_ranks(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                         group: dist.ProcessGroup | None):
    """``(logsumexp over all ranks' columns, target logit)`` from this rank's partials.

    Two collectives: all-reduce MAX of ``m``, then all-reduce SUM of ``[s * exp(m - M), t]``.
    """
    big = m.clone()
    if group is not None:
        dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
    safe = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    st = torch.stack([s * torch.exp(m - safe), t])
    if group is not None:
        dist.all_reduce(st, op=dist.ReduceOp.SUM, group=group)
    return safe + torch.log(st[0]), st[1]


# --------------------------------------------------------------------------- autograd collectives
class _AllReduceIdentityGrad(torch.autograd.Function):
    """Forward: sum over the group. Backward: identity (the result is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _IdentityAllReduceGrad(torch.autograd.Function):
    """Forward: identity of a replicated input. Backward: sum the partial grads over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def reduce_forward(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _AllReduceIdentityGrad.apply(x, group)


def reduce_backward(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _IdentityAllReduceGrad.apply(x, group)


# --------------------------------------------------------------------------- device checks
def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: Whether the kernels of this package were defined (``@triton.jit``) in interpreter mode:
#: Triton reads ``TRITON_INTERPRET`` when a kernel is defined, not when it is launched.
DEFINED_INTERPRETED = interpreting()


def check_triton_tensors(*tensors: torch.Tensor) -> None:
    for x in tensors:
        if x.device.type != "cpu":
            continue
        if not interpreting():
            raise RuntimeError(
                "soda_kernels Triton kernels got a CPU tensor: run on a CUDA GPU, or set "
                "TRITON_INTERPRET=1 before soda_kernels is imported to run them (slowly) on CPU, "
                "or use impl='torch' / kernels.loss=torch"
            )
        if not DEFINED_INTERPRETED:
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after soda_kernels was imported, so its kernels were "
                "compiled for a GPU; set it before the first import of soda_kernels"
            )
