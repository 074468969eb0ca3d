"""The recompute backward of the fused linear cross-entropy: its plan (slice width, row
padding, memory bound, cost model) and its one pass over vocabulary slices.

Per slice of ``S`` columns (:func:`default_vocab_slice`): recomputed logits -> ``dlogits``
slice (:func:`~.flce_ops.grad_logits_triton`), ``grad_W[slice]`` stored or added into
Megatron's fp32 ``main_grad`` (written exactly once), and the fp32 ``grad_h`` accumulator
updated; then ``grad_h`` is all-reduced over TP and scattered into ``grad_hidden``. See
:mod:`.fused_linear_cross_entropy` for the whole design.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import triton

from soda_kernels._launch import gpu_like
from soda_kernels._vocab_parallel import interpreting
from soda_kernels.flce_ops import (
    grad_logits_torch,
    grad_logits_triton,
    matmul_torch,
    padded_width,
)
from soda_kernels.flce_roofline import ideal_work, recompute_launches
from soda_kernels.gemm_engine import gemm


def default_vocab_slice(h: int, n_valid: int, device: torch.device) -> int:
    """Backward vocabulary slice ``S``: CUDA ``max(8192, 4 H)`` columns (enough ``grad_W``
    tiles to fill the GPU), CPU 1024; never more than ``n_valid``; a multiple of 256."""
    cols = max(8192, 4 * h) if gpu_like(device) else 1024
    return max(1, min(triton.cdiv(cols, 256) * 256, n_valid))


#: Share of the logits-free minimum (``W`` + its gradient buffer + hidden + grad_hidden + one
#: ``dlogits`` slice) that the backward's extra ``dlogits`` slices of a ``grad_h`` pass may
#: take on a GPU, next to ``h_a`` and the fp32 accumulator: the loss stays <= 1.2x.
GRAD_H_SHARE = 0.15


def default_grad_h_slices(n: int, h: int, vocab_slice: int, n_valid: int, dtype: torch.dtype,
                          device: torch.device, impl: str, main_grad: bool = False) -> int:
    """Vocabulary slices per ``grad_h`` pass of the backward (:func:`backward_slices`).

    Each pass reads and writes the fp32 ``[N_a, H]`` accumulator (``8 N_a H`` bytes: ~134 MB
    at N = 8192, H = 2048, once per 8192-column slice, 2.4 GB per micro-batch at TP1);
    keeping ``k`` slices' ``dlogits`` (``N_a S e`` bytes each) divides that by ``k``. On a GPU
    ``k`` is the most that fits :data:`GRAD_H_SHARE` of the logits-free minimum (``N`` rows:
    the bound holds whatever the mask); 1 on CPU, where the accumulator stays in cache and
    the CPU measurements were made with one slice per pass; 1 when a Triton slice is not a
    multiple of 16 columns (slices sit back to back in the pass's buffer, and only the last
    one may be padded)."""
    if not gpu_like(device) or n_valid <= 0 or n <= 0:
        return 1
    if impl == "triton" and vocab_slice % 16:
        return 1
    e = torch.empty((), dtype=dtype).element_size()
    minimum = n_valid * h * (e + (4 if main_grad else e)) + 2 * n * h * e + n * vocab_slice * e
    spare = GRAD_H_SHARE * minimum - n * h * (e + 4)
    k = 1 + int(max(0.0, spare) // (n * vocab_slice * e))
    return max(1, min(k, triton.cdiv(n_valid, vocab_slice)))


def backward_extra_bytes(n_active: int, h: int, vocab_slice: int, dtype: torch.dtype,
                         impl: str, grad_h_slices: int = 1) -> int:
    """Upper bound of the backward's temporaries (besides grad_hidden and grad_W).

    ``h_a`` (``N_a H e``) + fp32 ``grad_h`` accumulator (``4 N_a H``) + the ``dlogits`` of one
    ``grad_h`` pass (``grad_h_slices`` slices, ``N_a k S e``) + O(N_a) vectors;
    ``impl="torch"`` adds its fp32 logits slice (``4 N_a S``) and, for bf16/fp16 on CPU, fp32
    upcasts of ``h_a`` and of the pass's ``dlogits`` and weight rows and the fp32 matmul
    results. Under ``TRITON_INTERPRET`` bf16 outputs pass through fp32 copies of one slice
    (``4 N_a S + 4 S H``). For ``impl="triton"`` ``N_a`` is rounded up to a multiple of 64,
    the padding of :func:`row_multiple` on CUDA, and ``S`` to a multiple of 16
    (:func:`padded_width`).
    """
    e = torch.empty((), dtype=dtype).element_size()
    if impl == "triton":
        n_active += -n_active % 64
        vocab_slice = padded_width(vocab_slice, impl)
    group = vocab_slice * max(1, grad_h_slices)
    extra = n_active * h * (e + 4) + n_active * group * e + 64 * n_active
    if impl == "torch":
        extra += 4 * n_active * vocab_slice
        if e != 4:
            extra += 4 * (n_active * h + group * h) * 2 + 4 * n_active * group
    elif interpreting() and e != 4:
        extra += 4 * n_active * vocab_slice + 4 * vocab_slice * h
    return extra


def cost_model(n: int, n_active: int, h: int, n_valid: int, elt: int, vocab_slice: int,
               main_grad: bool = False, grad_h_slices: int = 1) -> dict:
    """FLOPs and DRAM bytes of one forward + backward of this design, next to the ideal.

    ``flops``: the four ``2 N_a H V`` matmuls (forward logits, recomputed logits, grad_W,
    grad_h); ``ideal_flops`` = ``6 N H V``, what a loss that kept its logits would need.
    ``bytes``: the launches of :func:`~.flce_roofline.recompute_launches` (each operand read
    once, each output written once; weight re-reads across row tiles served by L2): the row
    gathers, ``W`` once in the forward and twice in the backward, ``dlogits`` written once and
    read twice, ``h_a`` read twice per slice, the fp32 ``grad_h`` accumulator
    read-modify-written once per ``grad_h`` pass, ``grad_W`` written once (``main_grad``: read
    and written in fp32). ``ideal_bytes``: read ``W`` and ``h`` once, write ``grad_W`` and
    ``grad_h`` once. ``grad_h_passes``: accumulator passes.
    """
    slices = triton.cdiv(n_valid, max(1, min(vocab_slice, n_valid))) if n_valid else 0
    passes = triton.cdiv(slices, max(1, grad_h_slices))
    launches = recompute_launches(n, n_active, h, n_valid, elt, vocab_slice, main_grad,
                                  grad_h_slices)
    return {"flops": launches.flops, "bytes": launches.bytes,
            **ideal_work(n, h, n_valid, elt, main_grad),
            "slices": slices, "grad_h_passes": passes,
            "grad_h_accumulator_bytes": (8 * passes - 4 * bool(passes)) * n_active * h}


def _n_valid(weight: torch.Tensor, vocab_start: int, num_real_vocab: int) -> int:
    return max(0, min(weight.shape[0], num_real_vocab - vocab_start))


_ROW_POLICY: list[str] = []


@contextmanager
def row_policy(policy: str) -> Iterator[None]:
    """Within the block, inactive rows are ``"compact"``-ed or ``"mask"``-ed on every device
    (default: :func:`compacts_rows`). Tests run the GPU's policy on CPU with it."""
    if policy not in ("compact", "mask"):
        raise ValueError(f"row policy must be 'compact' or 'mask', got {policy!r}")
    _ROW_POLICY.append(policy)
    try:
        yield
    finally:
        _ROW_POLICY.pop()


def compacts_rows(device: torch.device) -> bool:
    """Whether inactive rows are compacted away before the matmuls (else masked).

    Compacting needs the number of active rows on the host (``nonzero``), which on a GPU
    waits for every queued kernel: one host synchronisation per micro-batch and direction.
    So rows are compacted only where the host is the device (CPU, the interpreter); on a GPU
    every row goes through the kernels, inactive ones as zero rows with upstream gradient 0
    and label -1 (their dlogits rows, and so their share of ``grad_W`` and ``grad_h``, are
    exact zeros, whatever the hidden state held there) and the loss never waits for the
    device. The zeroed copy of ``hidden`` takes the place of the compacted one.
    NOTE: the price is the inactive rows' matmul work on a GPU (S2ST sources, padding).
    Skipping it without a sync needs the kernels to read the active-row count from device
    memory (rows sorted active-first, fixed capacity N): not done yet.
    """
    if _ROW_POLICY:
        return _ROW_POLICY[-1] == "compact"
    return not gpu_like(device)


def active_index(active: torch.Tensor) -> torch.Tensor | None:
    """Indices of the active rows when they are compacted (:func:`compacts_rows`), else None."""
    return active.nonzero().squeeze(1) if compacts_rows(active.device) else None


def take_rows(x: torch.Tensor, idx: torch.Tensor | None, active: torch.Tensor,
              fill=None) -> torch.Tensor:
    """The rows of ``x`` the kernels see: the active ones (``idx``), or all of them with the
    inactive ones set to ``fill`` (kept as they are when ``fill`` is None)."""
    if idx is not None:
        return x.index_select(0, idx)
    if fill is None:
        return x
    return torch.where(active.view(-1, *[1] * (x.dim() - 1)), x, fill)


def put_rows(values: torch.Tensor, idx: torch.Tensor | None,
             active: torch.Tensor) -> torch.Tensor:
    """``[N, ...]``: ``values`` (one per row :func:`take_rows` gave) at the active rows,
    exact zeros elsewhere."""
    if idx is not None:
        out = values.new_zeros((active.shape[0],) + tuple(values.shape[1:]))
        return out.index_copy_(0, idx, values)
    return torch.where(active.view(-1, *[1] * (values.dim() - 1)), values[:active.shape[0]], 0)


def row_multiple(device: torch.device, impl: str) -> int:
    """Compacted rows are padded (zero rows, zero gradient) to a multiple of this: on CUDA
    the Triton matmuls then see a row count divisible by 16, which Triton's JIT specialises
    on and its pipeliner needs to turn the masked loads into async copies (without it the
    ``grad_W`` matmul, whose reduction runs over the rows, is not software-pipelined)."""
    return 64 if impl == "triton" and gpu_like(device) and not interpreting() else 1


def backward_slices(h_a, weight, labels_a, lse_a, g_a, grad_weight, accumulate: bool, acc,
                    z_loss: float, vocab_start: int, n_valid: int, impl: str,
                    vocab_slice: int, tma: bool = False, grad_h_slices: int = 1,
                    engine: str = "triton") -> None:
    """The backward's pass over vocabulary slices on the compacted rows ``h_a``: per slice,
    dlogits (into one reused buffer, the last slice :func:`padded_width` wide), then
    ``grad_weight[slice]`` stored or added; per ``grad_h_slices`` slices (one ``grad_h``
    pass) ``acc (+)= dlogits[pass] @ W[pass]``, so the fp32 accumulator is read and written
    once per pass, not per slice (:func:`default_grad_h_slices`). ``tma``: the two matmuls
    read their operands through TMA descriptors (Triton only; opt-in). ``engine``: the two
    matmuls' GEMM engine under ``impl="triton"`` (:mod:`.gemm_engine`)."""
    n_rows, h = h_a.shape
    triton_impl = impl == "triton"
    fill = grad_logits_triton if triton_impl else grad_logits_torch
    mm = (lambda *a, **k: gemm(*a, engine=engine, tma=tma, **k)) if triton_impl else matmul_torch
    s = min(vocab_slice, n_valid)
    k = max(1, grad_h_slices) if not (triton_impl and s % 16) else 1
    group = min(k * s, n_valid)
    dl_buf = torch.empty(n_rows, padded_width(group, impl), device=h_a.device,
                         dtype=weight.dtype)
    for p, g0 in enumerate(range(0, n_valid, group)):
        g1 = min(g0 + group, n_valid)
        for v0 in range(g0, g1, s):
            w_s = weight[v0:min(v0 + s, g1)]
            # NOTE: slices lie back to back (s is 16-divisible when k > 1); only the pass's
            # last slice can be ragged, and its zero padding ends the pass's columns.
            dl = dl_buf[:, v0 - g0:v0 - g0 + padded_width(w_s.shape[0], impl)]
            fill(h_a, w_s, labels_a, lse_a, g_a, vocab_start + v0, z_loss, dl, key_v=n_valid)
            mm(dl.t(), h_a, grad_weight[v0:v0 + w_s.shape[0]], accumulate, name="grad_weight",
               key_h=h, key_v=n_valid)
        mm(dl_buf[:, :padded_width(g1 - g0, impl)], weight[g0:g1], acc, p > 0,
           name="grad_hidden", key_h=h, key_v=n_valid)


def _backward(grad_loss, hidden, weight, labels, active, lse, grad_weight, accumulate: bool,
              z_loss: float, vocab_start: int, n_valid: int, group, impl: str,
              vocab_slice: int, grad_h_slices: int = 1, engine: str = "triton") -> torch.Tensor:
    """grad_hidden; ``grad_weight`` (``[V_local, H]``) gets ``dloss/dW`` stored or added."""
    idx = active_index(active)
    n_a, h = hidden.shape[0] if idx is None else idx.numel(), hidden.shape[1]
    if not accumulate:
        grad_weight[n_valid:].zero_()  # padded rows are never predicted
    pad = -n_a % row_multiple(hidden.device, impl)
    acc = torch.empty(n_a + pad, h, device=hidden.device, dtype=torch.float32)
    if n_a == 0 or n_valid == 0:
        acc.zero_()
        if not accumulate:
            grad_weight.zero_()
    else:
        h_a = take_rows(hidden, idx, active, 0.0)
        labels_a, lse_a = take_rows(labels, idx, active, -1), take_rows(lse, idx, active)
        g_a = take_rows(grad_loss, idx, active, 0.0).float()
        if pad:  # zero rows with zero upstream gradient: their dlogits rows are exact zeros
            h_a = torch.cat([h_a, h_a.new_zeros(pad, h)])
            labels_a = torch.cat([labels_a, labels_a.new_full((pad,), -1)])
            lse_a, g_a = torch.cat([lse_a, lse_a.new_zeros(pad)]), torch.cat([g_a, g_a.new_zeros(pad)])
        backward_slices(h_a, weight, labels_a, lse_a, g_a, grad_weight, accumulate, acc,
                        z_loss, vocab_start, n_valid, impl, vocab_slice,
                        grad_h_slices=grad_h_slices, engine=engine)
    acc = acc[:n_a]
    if group is not None:
        dist.all_reduce(acc, group=group)
    return put_rows(acc.to(hidden.dtype), idx, active)
