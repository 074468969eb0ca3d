"""The engine of the fused loss's plain GEMMs: the project's Triton matmul or torch (cuBLAS).

Three matmuls of the fused linear cross-entropy are plain GEMMs with an fp32 result:
``grad_W (+)= dlogits^T h`` (added into Megatron's fp32 ``main_grad``), ``grad_h = dlogits W``
and the three-matmul path's fp32 logits chunk ``x = h_c W^T``. The custom kernels keep what
only they can do (the fused lse, the recomputed ``dlogits``, the chunk softmax gradient);
these three can run on either engine (``kernels.gemm_engine``):

* ``triton``: :func:`~.flce_ops.matmul_triton` (autotuned on CUDA, grouped tile order);
* ``torch``: :func:`matmul_cublas`, ``torch.mm`` / ``addmm`` -- cuBLAS on CUDA -- with fp32
  accumulation under the same precision policy (:func:`~.flce_tuning.dot_precision`: fp32
  operands follow ``torch.backends.cuda.matmul``, 16-bit operands multiply in their dtype and
  accumulate in fp32). For 16-bit operands and an fp32 result it calls
  ``torch.addmm(c, a, b, out_dtype=torch.float32, out=c)`` (cuBLAS ``GemmEx`` with an fp32
  ``C`` and ``beta = 1``: the sum lands in ``main_grad`` without a weight-sized temporary).
  Where that overload does not exist (CPU; a torch without it) the operands are upcast to
  fp32 one block of at most :data:`BLOCK` rows or columns of the longest dimension at a time
  (exact products, fp32 sums: the ``impl="torch"`` path's rule), so upcasts stay block-sized.

Both engines take the same arguments as :func:`~.flce_ops.matmul_triton`: ``a`` may carry
extra zero rows / columns (a :func:`~.flce_ops.padded_width` ``dlogits`` slice), ``c`` extra
columns that get zeros (a padded logits chunk, no ``accumulate``). Deterministic for fixed
shapes: cuBLAS picks one algorithm per shape and runs it without atomics on one stream (with
several streams set ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, as for any bitwise-reproducible
cuBLAS run); the blocked CPU path has a fixed block order. Which engine is faster at a shape
is measured, not assumed (:mod:`.flce_measure`; ``benchmarks/bench_kernels.py``).
"""

from __future__ import annotations

import logging

import torch

from soda_kernels.flce_ops import WORK, matmul_triton

ENGINES = ("triton", "torch")
#: Rows / columns of the longest dimension per block of the upcasting fallback.
BLOCK = 1024
LOG = logging.getLogger("soda_kernels.flce")
_NO_OUT_DTYPE: set = set()  # device types whose torch lacks addmm(out_dtype=); warned once


def gemm(a, b, c, accumulate: bool, *, engine: str, name: str = "matmul", key_h: int = 0,
         key_v: int = 0, tma: bool = False):
    """``c (+)= a @ b`` on ``engine`` (``tma`` only for the Triton engine, where it is opt-in)."""
    if engine == "triton":
        return matmul_triton(a, b, c, accumulate, name=name, key_h=key_h, key_v=key_v, tma=tma)
    return matmul_cublas(a, b, c, accumulate, name=name)


def matmul_cublas(a, b, c, accumulate: bool, name: str = "matmul", **_):
    """``c (+)= a @ b`` through torch with fp32 accumulation (see the module docstring)."""
    k, n = b.shape
    m = c.shape[0]
    if a.shape[0] < m or a.shape[1] < k or c.shape[1] < n or (accumulate and c.shape[1] != n):
        raise ValueError(f"matmul_cublas: a {tuple(a.shape)}, b {tuple(b.shape)}, "
                         f"c {tuple(c.shape)}")
    a = a[:m, :k]
    WORK.add(name, m, n, k)
    if c.shape[1] > n:  # a padded logits chunk: its padding columns hold zeros
        c[:, n:].zero_()
        c = c[:, :n]
    if m == 0 or n == 0:
        return c
    if k == 0:
        if not accumulate:
            c.zero_()
        return c
    beta = 1 if accumulate else 0  # NOTE: beta = 0 ignores c's contents (NaN included)
    if a.dtype == c.dtype and (a.dtype == torch.float32 or a.is_cuda):
        # fp32, or a 16-bit result on CUDA (cuBLAS accumulates in fp32, rounds once).
        torch.addmm(c, a, b, beta=beta, out=c)
        return c
    if a.is_cuda and a.device.type not in _NO_OUT_DTYPE and c.dtype == torch.float32:
        try:
            torch.addmm(c, a, b, beta=beta, out_dtype=torch.float32, out=c)
            return c
        except (RuntimeError, TypeError, NotImplementedError) as err:
            _NO_OUT_DTYPE.add(a.device.type)
            LOG.warning("torch.addmm(out_dtype=float32) unavailable (%s): the torch GEMM engine "
                        "upcasts 16-bit operands block by block instead", err)
    _blocked_upcast(a, b, c, beta)
    return c


def _blocked_upcast(a, b, c, beta: int) -> None:
    """``c = beta c + a @ b`` with fp32 upcasts of at most :data:`BLOCK` rows / columns of the
    longest of ``M``, ``N``, ``K`` at a time (``c`` any dtype; 16-bit ``c`` is rounded once)."""
    m, k = a.shape
    n = b.shape[1]
    if c.dtype != torch.float32:  # a 16-bit result: compute in fp32, round once
        acc = c.float() if beta else torch.empty(c.shape, device=c.device, dtype=torch.float32)
        _blocked_upcast(a, b, acc, beta)
        c.copy_(acc)
        return
    if k >= max(m, n):
        for i, k0 in enumerate(range(0, k, BLOCK)):
            c.addmm_(a[:, k0:k0 + BLOCK].float(), b[k0:k0 + BLOCK].float(),
                     beta=beta if i == 0 else 1)
    elif m >= n:
        b32 = b.float()
        for m0 in range(0, m, BLOCK):
            c[m0:m0 + BLOCK].addmm_(a[m0:m0 + BLOCK].float(), b32, beta=beta)
    else:
        a32 = a.float()
        for n0 in range(0, n, BLOCK):
            c[:, n0:n0 + BLOCK].addmm_(a32, b[:, n0:n0 + BLOCK].float(), beta=beta)
