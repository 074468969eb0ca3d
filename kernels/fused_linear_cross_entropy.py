"""Vocabulary-parallel fused linear cross-entropy with z-loss and per-modality statistics.

Math, for token n with final hidden state ``h_n`` (``[H]``), label ``y_n`` and the output
layer ``W`` split by rows over the tensor-parallel (TP) group (rank r holds ``W_r``,
``[V_local, H]``, global ids ``[vocab_start, vocab_start + V_local)``)::

    x_n,v = <h_n, W_v>                       logits, only over real ids v < num_real_vocab
    lse_n = log sum_v exp(x_n,v)             over all ranks' columns
    loss_n = lse_n - x_n,y_n + z * lse_n^2   (0 where the token is not active)
    dloss_n / dx_n,v = softmax_n,v * (1 + 2 z lse_n) - [v == y_n]

A token is *active* when its loss-mask entry is non-zero, its loss group is >= 0 and its
label is a real id; padded vocabulary rows (ids >= ``num_real_vocab``) are never in the
softmax and get zero gradient. Per-group sums of the loss and token counts (groups 0 text,
1 semantic, 2 acoustic by default) come from the per-token vector, O(N), no pass over V.

Shapes: hidden ``[N, H]``, weight ``[V_local, H]`` (same dtype), labels / loss_mask /
loss_groups ``[N]``. Outputs: loss ``[N]`` fp32, lse ``[N]`` fp32 (0 where not active),
group_loss ``[G]`` fp32, group_tokens ``[G]`` int64.

How (``impl="triton"``; ``impl="torch"`` runs the same plan with plain PyTorch ops):

* **Inactive rows are compacted away first** (S2ST sources, padding: loss mask 0). Both
  directions gather the ``N_a`` active rows of ``hidden`` (``index_select``) and every matmul
  below runs on ``N_a`` rows; inactive rows get loss 0, lse 0 and exact-zero gradients.
  :data:`WORK` counts the matmul work actually launched (tests check it).
* forward: ``_lse_partials_kernel`` runs on a grid of (row tiles x vocabulary splits); each
  program streams its columns in ``BLOCK_V`` tiles, computes the logit tile with ``tl.dot``
  over ``BLOCK_H`` slices of H, and keeps an online logsumexp ``(max, sum-exp)`` and the
  target logit in fp32 registers. The splits are merged, then the ranks: one all-reduce MAX
  of the max and one all-reduce SUM of ``[sum-exp rescaled, target logit]`` (Megatron's
  ``vocab_parallel_cross_entropy`` does the same with three all-reduces over materialised
  logits). Only ``lse`` ``[N]`` is kept for backward.
* backward, **one pass over vocabulary slices** of ``S`` columns (:func:`default_vocab_slice`),
  each weight-gradient block written exactly once:

  1. ``_grad_logits_kernel`` recomputes the slice's logits of the active rows and writes
     ``dlogits [N_a, S]`` (weight dtype; fp32 for fp32 weights);
  2. ``_matmul_kernel``: ``grad_W[slice] = dlogits^T @ h_a``, accumulated in fp32 registers
     and stored once, either in the weight dtype (the returned gradient) or **added into
     Megatron's fp32 ``main_grad``** (gradient-accumulation fusion, below);
  3. ``_matmul_kernel``: ``grad_h_a += dlogits @ W[slice]`` into an fp32 ``[N_a, H]``
     accumulator.

  ``grad_h_a`` is all-reduced over TP in fp32 (the input gradient of a column-parallel
  linear; only active rows travel) and scattered into ``grad_hidden``. No atomics, fixed
  loop orders: the backward is deterministic (bitwise, for a fixed kernel configuration).

Memory (besides inputs, ``grad_hidden`` and, unless fused into ``main_grad``, ``grad_W``):
the forward holds O(N) statistics and the ``[N_a, H]`` compacted rows while it runs; the
backward holds the compacted rows ``h_a`` (``N_a H e``), the fp32 accumulator
(``4 N_a H``) and one ``dlogits`` slice (``N_a S e``), ``e`` the bytes per weight element;
``impl="torch"`` adds one fp32 ``[N_a, S]`` logits slice (plus fp32 upcasts of bf16 operands
on CPU). No ``[V, H]``-sized temporary exists: :func:`backward_extra_bytes` states the bound
and a test checks it against the CPU allocator. Under ``TRITON_INTERPRET`` the bf16 outputs
pass through an fp32 slice-sized buffer (see the NOTE in :func:`matmul_triton`).

Gradient into ``main_grad``: Megatron's DDP gives each parameter an fp32 ``main_grad`` view
into its gradient buffer and sets ``grad_added_to_main_grad``; when the weight has both,
step 2 adds ``grad_W`` straight into ``main_grad`` (fp32 accumulation across micro-batches,
no bf16 rounding of the gradient, no second weight-sized buffer), marks
``grad_added_to_main_grad`` and hands autograd a zero-cost placeholder (see
:class:`FusedLinearCrossEntropyFunction`). ``fuse_main_grad=False`` turns it off.

Precision policy (one for both directions and both implementations; :func:`dot_precision`):
fp32 inputs follow ``torch.backends.cuda.matmul`` (TF32 tensor cores when
``allow_tf32`` / ``fp32_precision == "tf32"``, as cuBLAS does for the torch path, else
IEEE fp32); bf16 / fp16 inputs multiply in their dtype with fp32 accumulation everywhere
(logits, ``grad_W``, ``grad_h``); the softmax, lse and losses are fp32. On CPU fp32 is IEEE.

Tuning: on CUDA each kernel is a ``triton.autotune`` over a small pruned Hopper-oriented
space keyed on ``(H, V_local, dtypes)`` (not on N, which changes with the mask); the two
backward matmuls are separate roles with their own spaces and entries (``KEY_ROLE``: Triton's
autotuner and its disk cache would otherwise hand grad_h the config tuned for grad_W). The
backward kernels use grouped ("swizzled") program order so programs running together share
weight tiles in L2 (the forward grid runs all row tiles of one vocabulary split together,
which streams the same weight columns at the same time). The forward's V and H loops are one
flattened software-pipelined loop (``tl.range(flatten=True)``). The compacted rows are padded
to a multiple of 64 on CUDA and every ``dlogits`` slice to a multiple of 16 columns
(:func:`padded_width`, zeros), so the matmuls' main loops are software-pipelined with 16-byte
async copies on every slice, the ragged last one included. :mod:`soda_kernels.compile_check`
compiles every kernel x config for sm_90a with the production arguments and reads the code
(``benchmarks/results/sm90_codegen.md``). Under ``TRITON_INTERPRET`` (CPU) the kernels run with
one fixed small configuration, or any GPU config through :func:`pinned_configs` (the tests run
every one). A tuned config is chosen per process (``cache_results`` keeps it on disk): bits
are repeatable for a fixed config, not across a re-tune that picks another tile shape.

:func:`fused_linear_cross_entropy_reference` materialises all logits in fp32 (or fp64) and
uses autograd: it is the ground truth for tests and benchmarks.

Both implementations are ``torch.library`` custom ops (``soda_kernels::flce_forward`` /
``flce_backward``) with fake (meta) functions, called from a ``torch.autograd.Function``, so
``torch.compile(fullgraph=True)`` traces through them without a graph break. The TP group
crosses the op boundary as its name (see :mod:`._vocab_parallel`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from soda_kernels._launch import gpu_like, launch
from soda_kernels._vocab_parallel import (
    check_triton_tensors,
    combine_across_ranks,
    group_rank_size,
    interpreting,
    merge_partials,
    reduce_backward,
    reduce_forward,
    register_group,
    resolve_group,
)

NUM_LOSS_GROUPS = 3  # text (incl. special), semantic, acoustic: soda_mega.tokens.LOSS_GROUPS


# ============================================================================ work counter
@dataclass
class WorkCounter:
    """Matmuls launched by this module since :meth:`reset`: ``(name, M, N, K)`` each.

    ``name`` is ``lse`` (forward logits), ``dlogits`` (recomputed logits), ``grad_weight``
    or ``grad_hidden``; ``M x K`` times ``K x N``. Host-side bookkeeping, no device sync.
    """

    calls: list = field(default_factory=list)

    def reset(self) -> None:
        self.calls.clear()

    def add(self, name: str, m: int, n: int, k: int) -> None:
        self.calls.append((name, int(m), int(n), int(k)))

    @property
    def flops(self) -> int:
        return sum(2 * m * n * k for _, m, n, k in self.calls)


WORK = WorkCounter()


# ============================================================================ precision policy
def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``tl.dot`` ``input_precision`` for ``dtype`` operands, the module's one policy.

    fp32 on CUDA: ``"tf32"`` when torch's CUDA matmuls may use TF32
    (``torch.backends.cuda.matmul.allow_tf32`` or ``fp32_precision == "tf32"``), else
    ``"ieee"``; the torch path gets the same from cuBLAS. CPU: ``"ieee"``. bf16 / fp16:
    Triton's default ``"tf32"``, which only governs fp32 operands: 16-bit operands always
    multiply on tensor cores with fp32 accumulation (the interpreter's upcast bf16 values fit
    TF32 exactly).
    """
    if dtype != torch.float32:
        return "tf32"
    if device.type != "cuda":
        return "ieee"
    m = torch.backends.cuda.matmul
    tf32 = bool(m.allow_tf32) or getattr(m, "fp32_precision", "none") == "tf32"
    return "tf32" if tf32 else "ieee"


# ============================================================================ Triton kernels
@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles sweep the column tiles together (L2 reuse)."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 ``[BLOCK_N, BLOCK_V]`` tile of ``h[rows] @ W[cols]^T`` (0 where masked)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            # NOTE: Triton's CPU interpreter (3.8) returns garbage for bf16 tl.dot; bf16
            # products are exact in fp32, so upcasting gives the GPU's bf16-MMA result.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lse_partials_kernel(h_ptr, w_ptr, label_ptr, m_ptr, s_ptr, t_ptr,
                         N, H, n_valid, vocab_start, splits, stride_h, stride_w,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Per (row tile, vocabulary split): online max / sum-exp / target logit, fp32."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    target = tl.load(label_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
    cols_per_split = tl.cdiv(tl.cdiv(n_valid, BLOCK_V), splits) * BLOCK_V
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, n_valid)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    # NOTE: flatten=True makes Triton's pipeliner fuse this loop with the H loop inside
    # _logits_tile into one software-pipelined loop: the next V tile's loads are in flight
    # while this tile's softmax runs, instead of a drain and a new prologue per V tile
    # (compile_check: one main loop, not nested).
    for v0 in tl.range(v_lo, v_hi, BLOCK_V, flatten=True):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        x = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        x = tl.where(col_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
        hit = (cols[None, :] == target[:, None]) & col_ok[None, :]
        t += tl.sum(tl.where(hit, x, 0.0), axis=1)
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, label_ptr, lse_ptr, g_ptr, dl_ptr,
                        N, H, n_cols, n_store, col_start, z_loss, stride_h, stride_w, stride_dl,
                        KEY_V,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``dl[n, v] = g_n * (softmax_n,v * (1 + 2 z lse_n) - [v == y_n])`` for one tile of the
    slice ``W[0:n_cols]`` (``w_ptr`` points at the slice; its first column has global id
    ``col_start``); columns ``[n_cols, n_store)`` of ``dl`` get exact zeros (the padding that
    keeps the slice width, and so the store and the matmuls' loads, 16-divisible).
    ``KEY_V`` only keys the autotuner."""
    pid_n, pid_v = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(n_store, BLOCK_V),
                            GROUP_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < n_cols
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    target = tl.load(label_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - col_start
    x = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
    p = tl.exp(x - lse[:, None])
    d = p * (1.0 + 2.0 * z_loss * lse)[:, None]
    d = d - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    # NOTE: where() rather than multiply, so rows with g = 0 stay 0 even if p overflowed.
    d = tl.where((g != 0.0)[:, None] & col_ok[None, :], d * g[:, None], 0.0)
    ptrs = dl_ptr + rows.to(tl.int64)[:, None] * stride_dl + cols[None, :]
    tl.store(ptrs, d.to(dl_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < n_store)[None, :])


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, A_M, A_K, stride_am, stride_ak, stride_bk,
                   stride_bn, stride_cm, stride_cn, KEY_H, KEY_V, KEY_ROLE,
                   ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr):
    """``C (+)= A @ B`` with fp32 accumulation, each C tile written once by one program.

    ``C`` is ``[M, N]``, ``B`` ``[K, N]``; ``A`` is loaded as ``[A_M, A_K]`` (``A_M >= M``,
    ``A_K >= K``, the extra rows / columns zeros: the dlogits slice padded to a 16-divisible
    width, so A's loads stay vectorised and asynchronous on the last, ragged slice; rows of
    ``B`` beyond ``K`` are masked, never read). Any strides (transposes are free);
    ``ACCUMULATE`` adds the fp32 tile to C's current value (Megatron's ``main_grad``, or the
    fp32 ``grad_h`` accumulator) before the store. ``KEY_H`` / ``KEY_V`` / ``KEY_ROLE`` only
    key the autotuner (``KEY_ROLE`` keeps the two backward matmuls' entries apart).
    """
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    # NOTE: pointers advanced by BLOCK_K each step (64-bit pointer arithmetic, no int32
    # offset overflow) rather than recomputed from k: in this form Triton's pipeliner turns
    # the loads into multi-stage async copies (checked with soda_kernels.compile_check).
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_m_ok = rm < A_M
    for k0 in range(0, A_K, BLOCK_K):
        a = tl.load(a_ptrs, mask=a_m_ok[:, None] & (rk < A_K - k0)[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=(rk < K - k0)[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)  # NOTE: see _logits_tile (interpreter bf16 tl.dot)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    c_ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _matmul_tma_kernel(a_ptr, b_ptr, c_ptr, M, N, K, A_M, A_K, stride_am, stride_ak, stride_bk,
                       stride_bn, stride_cm, stride_cn, KEY_H, KEY_V, KEY_ROLE,
                       A_COL_MAJOR: tl.constexpr, ACCUMULATE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """:func:`_matmul_kernel` with both operands read through TMA tensor descriptors (made on
    the device, ``tl.make_tensor_descriptor``; Hopper's copy engine zero-fills out-of-bounds
    rows, so ``B``'s rows past ``K`` need no mask). Same arguments; ``B`` and ``A`` (or ``A^T``
    when ``A_COL_MAJOR``, the dlogits of ``grad_W``) must be row-major with 16-byte aligned row
    strides. Opt-in (``matmul_triton(tma=True)``): compiled and checked for sm_90a, not timed."""
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    if A_COL_MAJOR:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[A_K, A_M], strides=[stride_ak, 1],
                                           block_shape=[BLOCK_K, BLOCK_M])
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[A_M, A_K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, A_K, BLOCK_K):
        if A_COL_MAJOR:
            a = tl.trans(a_desc.load([k0, off_m]))
        else:
            a = a_desc.load([off_m, k0])
        b = b_desc.load([k0, off_n])
        if UPCAST:
            a = a.to(tl.float32)  # NOTE: see _logits_tile (interpreter bf16 tl.dot)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    c_ok = (rm < M)[:, None] & (rn < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


# ============================================================================ tuning
def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# NOTE: Hopper-oriented spaces, kept small (each distinct key benchmarks every surviving
# config once). Not timed in the session that wrote them (no GPU): their sm_90a code
# (registers, spills, shared memory, CTAs per SM, wgmma, async copies) is what
# ``python -m soda_kernels.compile_check`` reports (benchmarks/results/sm90_codegen.md); the
# GPU campaign (benchmarks/gpu_campaign.sh) is where they are timed and pruned further.
_LSE_CONFIGS = [
    _cfg(8, 3, BLOCK_N=128, BLOCK_V=128, BLOCK_H=64),
    _cfg(4, 4, BLOCK_N=64, BLOCK_V=128, BLOCK_H=64),
    _cfg(8, 3, BLOCK_N=64, BLOCK_V=256, BLOCK_H=64),
    _cfg(4, 4, BLOCK_N=128, BLOCK_V=64, BLOCK_H=64),
]
_DLOGITS_CONFIGS = [
    _cfg(8, 3, BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_M=8),
    _cfg(8, 3, BLOCK_N=128, BLOCK_V=256, BLOCK_H=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_N=128, BLOCK_V=128, BLOCK_H=32, GROUP_M=8),
]
# grad_W = dlogits^T @ h_a: M = slice width, N = H, K = active rows; A is column-major.
_GRAD_W_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
]
# grad_h += dlogits @ W[slice]: M = active rows, N = H, K = slice width; A is row-major.
_GRAD_H_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
]
#: Autotune space of each launch role (the ``role`` of :func:`soda_kernels._launch.launch`).
CONFIGS = {"lse": _LSE_CONFIGS, "dlogits": _DLOGITS_CONFIGS, "grad_weight": _GRAD_W_CONFIGS,
           "grad_hidden": _GRAD_H_CONFIGS, "matmul": _GRAD_H_CONFIGS,
           "grad_weight_tma": _GRAD_W_CONFIGS, "grad_hidden_tma": _GRAD_H_CONFIGS,
           "matmul_tma": _GRAD_H_CONFIGS}
#: ``KEY_ROLE`` of each matmul role: Triton's autotuner (and its on-disk cache) keys on the
#: wrapped kernel, the configs and the key values, so without it grad_W and grad_h (same
#: kernel, same H, V, ACCUMULATE) would share one entry and one tuned config.
_MATMUL_ROLE_KEYS = {"matmul": 0, "grad_weight": 1, "grad_hidden": 2}
_TUNE_KEYS = {"lse": ["H", "n_valid"], "dlogits": ["H", "KEY_V"],
              "matmul": ["KEY_H", "KEY_V", "KEY_ROLE", "ACCUMULATE"],
              "matmul_tma": ["KEY_H", "KEY_V", "KEY_ROLE", "ACCUMULATE"]}
_SMEM_BUDGET = 200 * 1024  # H100 / H200: 228 KB of shared memory per SM, leave room
_TILE_DIMS = {"lse": ("BLOCK_N", "BLOCK_H", "BLOCK_V"), "dlogits": ("BLOCK_N", "BLOCK_H", "BLOCK_V"),
              "matmul": ("BLOCK_M", "BLOCK_K", "BLOCK_N"), "matmul_tma": ("BLOCK_M", "BLOCK_K", "BLOCK_N")}


def _kind(role: str) -> str:
    if role in ("lse", "dlogits"):
        return role
    return "matmul_tma" if role.endswith("_tma") else "matmul"


def smem_estimate(role: str, config: triton.Config, elt: int) -> int:
    """Bytes of the pipelined operand tiles of ``config`` (``elt`` bytes per element)."""
    a_m, a_k, b_n = _TILE_DIMS[_kind(role)]
    return (config.kwargs[a_m] + config.kwargs[b_n]) * config.kwargs[a_k] * elt * config.num_stages


def _prune(role: str):
    """Drop configs whose pipelined operand tiles overflow shared memory (fp32 tiles double)."""

    def prune(configs, named_args, **kwargs):
        elt = next(v.element_size() for v in named_args.values() if hasattr(v, "element_size"))
        if named_args.get("UPCAST") or kwargs.get("UPCAST"):
            elt = 4
        keep = [c for c in configs if smem_estimate(role, c, elt) <= _SMEM_BUDGET]
        return keep or configs[-1:]

    return prune


_KERNELS = {"lse": _lse_partials_kernel, "dlogits": _grad_logits_kernel, "matmul": _matmul_kernel,
            "matmul_tma": _matmul_tma_kernel}
_TUNED = {}


def autotuner(role: str):
    """The ``triton.autotune`` wrapper of ``role``'s kernel (one per role, built on first use)."""
    if role not in _TUNED:
        kind = _kind(role)
        _TUNED[role] = triton.autotune(
            configs=CONFIGS[role], key=_TUNE_KEYS[kind],
            restore_value=["c_ptr"] if kind.startswith("matmul") else None,
            prune_configs_by={"early_config_prune": _prune(role)}, cache_results=True,
        )(_KERNELS[kind])
    return _TUNED[role]


# Fixed configurations: the CPU interpreter (cost grows with the number of programs, so tiles
# are kept few), or a caller's explicit ``blocks``.
_CPU = {"lse": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=32),
        "dlogits": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=32, GROUP_M=4),
        "matmul": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)}


_PINNED: dict = {}


@contextmanager
def pinned_configs(configs: dict):
    """Within the block, launches of each role in ``configs`` (``lse``, ``dlogits``,
    ``grad_weight``, ``grad_hidden``; a ``triton.Config`` or its block sizes) use that tile
    configuration instead of the autotuner's or the CPU's. Tests run every GPU config through
    the interpreter with it; on a GPU it reproduces one config's bits without a re-tune."""
    saved = dict(_PINNED)
    _PINNED.update({role: dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                    if isinstance(c, triton.Config) else dict(c) for role, c in configs.items()})
    try:
        yield
    finally:
        _PINNED.clear()
        _PINNED.update(saved)


def _flags(x: torch.Tensor) -> dict:
    return dict(UPCAST=interpreting() and x.dtype != torch.float32,
                PRECISION=dot_precision(x.dtype, x.device))


def _use_tuner(device: torch.device, blocks: Optional[dict]) -> bool:
    return gpu_like(device) and blocks is None and not interpreting()


def _run(role: str, device: torch.device, grid, args: tuple, consts: dict,
         blocks: Optional[dict]) -> None:
    """Launch ``role``'s kernel: autotuned on a GPU, else with ``blocks`` or the CPU tiles.
    ``grid`` maps the tile configuration to the launch grid."""
    kernel = _KERNELS[_kind(role)]
    blocks = blocks or _PINNED.get(role)
    if _use_tuner(device, blocks):
        launch(role, kernel, lambda meta: grid(meta), args, consts, tuner=lambda: autotuner(role))
    else:
        cfg = dict(blocks or _CPU[_kind(role)])
        launch(role, kernel, grid(cfg), args, {**consts, **cfg})


# ============================================================================ launchers
def _lse_splits(n: int, n_valid: int, device: torch.device) -> int:
    """Vocabulary splits of the forward grid: enough programs to fill the GPU (~4 per SM)."""
    if not gpu_like(device) or interpreting():
        return 1
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 132)  # meta: an H100 SXM
    return max(1, min(triton.cdiv(4 * sms, triton.cdiv(n, 128)), triton.cdiv(n_valid, 128)))


def lse_partials_triton(hidden, weight, labels, vocab_start: int, n_valid: int,
                        splits: Optional[int] = None, blocks: Optional[dict] = None):
    """This rank's ``(max, sum-exp, target logit)`` per row of ``hidden`` over columns
    ``[0, n_valid)`` (``hidden`` holds the active rows only)."""
    check_triton_tensors(hidden, weight, labels)
    n, h = hidden.shape
    splits = splits or _lse_splits(n, n_valid, hidden.device)
    stats = torch.empty(3, splits, n, device=hidden.device, dtype=torch.float32)
    WORK.add("lse", n, n_valid, h)
    if n == 0 or n_valid == 0:
        stats[0].fill_(float("-inf"))
        stats[1:].zero_()
        return merge_partials(stats[0], stats[1], stats[2], dim=0)
    args = (hidden, weight, labels, stats[0], stats[1], stats[2], n, h, n_valid, vocab_start,
            splits, hidden.stride(0), weight.stride(0))
    _run("lse", hidden.device, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits), args,
         _flags(hidden), blocks)
    return merge_partials(stats[0], stats[1], stats[2], dim=0)


def padded_width(cols: int, impl: str = "triton") -> int:
    """Columns of a ``dlogits`` slice of ``cols`` vocabulary columns: for ``impl="triton"``
    rounded up to a multiple of 16 (the extra columns hold zeros). A ragged last slice (TP1
    V = 144,644; TP2 rank 1; TP8 rank 7) then keeps 16-divisible bounds, and Triton keeps the
    dlogits stores and the matmuls' operand loads vectorised and asynchronous (with a width
    that is not a multiple of 16 they fall back to scalar 2-byte loads inside the main loop;
    ``compile_check`` shows both)."""
    return cols + (-cols % 16) if impl == "triton" else cols


def grad_logits_triton(h_a, w_slice, labels_a, lse_a, g_a, col_start: int, z_loss: float, out,
                       key_v: Optional[int] = None, blocks: Optional[dict] = None):
    """Fill ``out`` (``[rows, >= S]``, any row stride) with ``dloss/dlogits`` of the slice
    ``w_slice [S, H]`` whose first row has global id ``col_start``; columns of ``out`` beyond
    ``S`` (the :func:`padded_width` padding) get zeros."""
    check_triton_tensors(h_a, w_slice)
    rows, h = h_a.shape
    cols, store = w_slice.shape[0], out.shape[1]
    WORK.add("dlogits", rows, cols, h)
    if rows == 0 or cols == 0:
        out.zero_()
        return out
    # NOTE: Triton 3.8's interpreter truncates fp32 -> bf16 stores (GPUs round to nearest
    # even); there the kernel writes fp32 and torch rounds.
    dest = out if out.dtype == torch.float32 or not interpreting() else out.float()
    args = (h_a, w_slice, labels_a, lse_a, g_a, dest, rows, h, cols, store, col_start,
            float(z_loss), h_a.stride(0), w_slice.stride(0), dest.stride(0), key_v or cols)
    _run("dlogits", h_a.device,
         lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]) * triton.cdiv(store, meta["BLOCK_V"]),),
         args, _flags(h_a), blocks)
    if dest is not out:
        out.copy_(dest)
    return out


def _tma_allocator(size: int, alignment: int, stream):
    """Global scratch for the device-side TMA descriptors of ``_matmul_tma_kernel``."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def matmul_triton(a, b, c, accumulate: bool, name: str = "matmul", key_h: int = 0,
                  key_v: int = 0, blocks: Optional[dict] = None, tma: bool = False):
    """``c (+)= a @ b`` (2-D, any strides) with fp32 accumulation; ``c`` fp32 or ``a``'s dtype.

    ``a`` may be larger than ``[c rows, b rows]``: its extra rows / columns must be zeros (a
    :func:`padded_width` dlogits slice); they are loaded, never stored. ``name`` is the role
    (``grad_weight`` / ``grad_hidden``: separate autotune entries) and the :data:`WORK` name.
    ``tma`` reads both operands through TMA descriptors (``_matmul_tma_kernel``; ``b`` and
    ``a`` or ``a^T`` row-major): compiled and checked for sm_90a, not timed, so off by default.
    """
    check_triton_tensors(a, b, c)
    (a_m, a_k), (k, n), m = a.shape, b.shape, c.shape[0]
    if a_m < m or a_k < k or c.shape[1] != n:
        raise ValueError(f"matmul_triton: a {tuple(a.shape)}, b {tuple(b.shape)}, c {tuple(c.shape)}")
    WORK.add(name, m, n, k)
    if m == 0 or n == 0:
        return c
    if k == 0:
        if not accumulate:
            c.zero_()
        return c
    # NOTE: Triton 3.8's interpreter truncates fp32 -> bf16 stores; there a bf16 ``c`` (a
    # slice of the returned grad_W) goes through an fp32 copy of the same size.
    dest = c if c.dtype == torch.float32 or not interpreting() else c.float()
    role = name if name in _MATMUL_ROLE_KEYS else "matmul"
    args = (a, b, dest, m, n, k, a_m, a_k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            dest.stride(0), dest.stride(1), key_h, key_v, _MATMUL_ROLE_KEYS[role])
    consts = dict(ACCUMULATE=accumulate, **_flags(a))
    if tma:
        if b.stride(1) != 1 or min(a.stride()) != 1:
            raise ValueError("matmul_triton(tma=True) needs row-major b and row- or column-major a")
        consts["A_COL_MAJOR"] = a.stride(0) == 1 and a.stride(1) != 1
        if a.device.type == "cuda":
            triton.set_allocator(_tma_allocator)
        role += "_tma"
    _run(role, a.device,
         lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
         args, consts, blocks)
    if dest is not c:
        c.copy_(dest)
    return c


# ----------------------------------------------------------------------------- plain PyTorch
def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a @ b`` under the module's precision policy (bf16/fp16: fp32 accumulation)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            pass  # NOTE: a torch without mm(out_dtype=) on CUDA: exact upcast, slower
    return a.float() @ b.float()  # CPU: exact products, fp32 sums (slice-sized upcasts)


def lse_partials_torch(hidden, weight, labels, vocab_start: int, n_valid: int, vocab_slice: int):
    """Same statistics as :func:`lse_partials_triton`, one ``[rows, S]`` fp32 slice at a time."""
    n = hidden.shape[0]
    m = torch.full((n,), float("-inf"), device=hidden.device)
    s = torch.zeros(n, device=hidden.device)
    t = torch.zeros(n, device=hidden.device)
    WORK.add("lse", n, n_valid, hidden.shape[1])
    if n_valid == 0 or n == 0:
        return m, s, t
    local = labels.long() - vocab_start
    for v0 in range(0, n_valid, vocab_slice):
        x = _mm_f32(hidden, weight[v0:min(v0 + vocab_slice, n_valid)].t())
        inside = (local >= v0) & (local < v0 + x.shape[1])
        picked = x.gather(1, (local - v0).clamp(0, x.shape[1] - 1)[:, None]).squeeze(1)
        t += torch.where(inside, picked, torch.zeros_like(picked))
        m_s = x.amax(1)
        s_s = x.sub_(m_s[:, None]).exp_().sum(1)
        del x
        big = torch.maximum(m, m_s)
        s = s * torch.exp(m - big) + s_s * torch.exp(m_s - big)
        m = big
    return m, s, t


def grad_logits_torch(h_a, w_slice, labels_a, lse_a, g_a, col_start: int, z_loss: float, out,
                      **_):
    WORK.add("dlogits", h_a.shape[0], w_slice.shape[0], h_a.shape[1])
    x = _mm_f32(h_a, w_slice.t())
    x.sub_(lse_a[:, None]).exp_().mul_((g_a * (1.0 + 2.0 * z_loss * lse_a))[:, None])
    local = labels_a.long() - col_start
    hit = ((local >= 0) & (local < w_slice.shape[0])).nonzero().squeeze(1)
    x[hit, local[hit]] -= g_a[hit]
    out[:, :x.shape[1]].copy_(x)
    out[:, x.shape[1]:].zero_()
    return out


def matmul_torch(a, b, c, accumulate: bool, name: str = "matmul", **_):
    """``c (+)= a @ b`` in plain PyTorch under the same precision policy (``a`` cut to
    ``[c rows, b rows]``, as :func:`matmul_triton` allows)."""
    a = a[:c.shape[0], :b.shape[0]]
    WORK.add(name, a.shape[0], b.shape[1], a.shape[1])
    if a.dtype == torch.float32:
        if accumulate:
            c.addmm_(a, b)
        else:
            torch.mm(a, b, out=c)
        return c
    r = _mm_f32(a, b)
    if accumulate:
        c.add_(r)
    else:
        c.copy_(r)
    return c


# ============================================================================ plan
def default_vocab_slice(h: int, n_valid: int, device: torch.device) -> int:
    """Backward vocabulary slice ``S``: CUDA ``max(8192, 4 H)`` columns (enough ``grad_W``
    tiles to fill the GPU), CPU 1024; never more than ``n_valid``; a multiple of 256."""
    cols = max(8192, 4 * h) if gpu_like(device) else 1024
    return max(1, min(triton.cdiv(cols, 256) * 256, n_valid))


def backward_extra_bytes(n_active: int, h: int, vocab_slice: int, dtype: torch.dtype,
                         impl: str) -> int:
    """Upper bound of the backward's temporaries (besides grad_hidden and grad_W).

    ``h_a`` (``N_a H e``) + fp32 ``grad_h`` accumulator (``4 N_a H``) + one ``dlogits`` slice
    (``N_a S e``) + O(N_a) vectors; ``impl="torch"`` adds its fp32 logits slice (``4 N_a S``)
    and, for bf16/fp16 on CPU, fp32 upcasts of ``h_a`` and of a weight slice and the fp32
    ``[S, H]`` / ``[N_a, H]`` matmul results. Under ``TRITON_INTERPRET`` bf16 outputs pass through
    fp32 copies of one slice (``4 N_a S + 4 S H``). For ``impl="triton"`` ``N_a`` is rounded
    up to a multiple of 64, the padding of :func:`row_multiple` on CUDA, and ``S`` to a
    multiple of 16 (:func:`padded_width`).
    """
    e = torch.empty((), dtype=dtype).element_size()
    if impl == "triton":
        n_active += -n_active % 64
        vocab_slice = padded_width(vocab_slice, impl)
    extra = n_active * h * (e + 4) + n_active * vocab_slice * e + 64 * n_active
    if impl == "torch":
        extra += 4 * n_active * vocab_slice
        if e != 4:
            extra += 4 * (n_active * h + vocab_slice * h) * 2 + 4 * n_active * vocab_slice
    elif interpreting() and e != 4:
        extra += 4 * n_active * vocab_slice + 4 * vocab_slice * h
    return extra


def cost_model(n: int, n_active: int, h: int, n_valid: int, elt: int, vocab_slice: int,
               main_grad: bool = False) -> dict:
    """FLOPs and DRAM bytes of one forward + backward of this design, next to the ideal.

    ``flops``: the four ``2 N_a H V`` matmuls (forward logits, recomputed logits, grad_W,
    grad_h); ``ideal_flops`` = ``6 N H V``, what a loss that kept its logits would need.
    ``bytes``: every launch reads each operand once and writes each output once (a perfectly
    tiled kernel; weight re-reads across row tiles served by L2): the row gathers, ``W``
    twice in the backward and once in the forward, ``dlogits`` written once and read twice,
    ``h_a`` read twice per slice, the fp32 ``grad_h`` accumulator read-modify-written per
    slice, ``grad_W`` written once (``main_grad``: read and written in fp32).
    ``ideal_bytes``: read ``W`` and ``h`` once, write ``grad_W`` and ``grad_h`` once.
    """
    slices = triton.cdiv(n_valid, max(1, min(vocab_slice, n_valid))) if n_valid else 0
    gather = n * h * elt + n_active * h * elt
    forward = gather + n_active * h * elt + n_valid * h * elt
    grad_w = n_valid * h * (8 if main_grad else elt)
    backward = (gather + 2 * slices * n_active * h * elt + 2 * n_valid * h * elt
                + 3 * n_active * n_valid * elt + grad_w
                + max(0, 2 * slices - 1) * n_active * h * 4 + n_active * h * 4 + n * h * elt)
    return {"flops": 8 * n_active * h * n_valid, "ideal_flops": 6 * n * h * n_valid,
            "bytes": forward + backward,
            "ideal_bytes": 2 * n * h * elt + n_valid * h * (elt + (8 if main_grad else elt)),
            "slices": slices}


def _n_valid(weight: torch.Tensor, vocab_start: int, num_real_vocab: int) -> int:
    return max(0, min(weight.shape[0], num_real_vocab - vocab_start))


def row_multiple(device: torch.device, impl: str) -> int:
    """Compacted rows are padded (zero rows, zero gradient) to a multiple of this: on CUDA
    the Triton matmuls then see a row count divisible by 16, which Triton's JIT specialises
    on and its pipeliner needs to turn the masked loads into async copies (without it the
    ``grad_W`` matmul, whose reduction runs over the rows, is not software-pipelined)."""
    return 64 if impl == "triton" and gpu_like(device) and not interpreting() else 1


def backward_slices(h_a, weight, labels_a, lse_a, g_a, grad_weight, accumulate: bool, acc,
                    z_loss: float, vocab_start: int, n_valid: int, impl: str,
                    vocab_slice: int, tma: bool = False) -> None:
    """The backward's pass over vocabulary slices on the compacted rows ``h_a``: per slice,
    dlogits (into one reused buffer whose slices are :func:`padded_width` wide), then
    ``grad_weight[slice]`` stored or added, then ``acc (+)= dlogits @ W[slice]``. ``tma``:
    the two matmuls read their operands through TMA descriptors (Triton only; opt-in)."""
    n_rows, h = h_a.shape
    triton_impl = impl == "triton"
    fill = grad_logits_triton if triton_impl else grad_logits_torch
    mm = (lambda *a, **k: matmul_triton(*a, tma=tma, **k)) if triton_impl else matmul_torch
    s = min(vocab_slice, n_valid)
    dl_buf = torch.empty(n_rows, padded_width(s, impl), device=h_a.device, dtype=weight.dtype)
    for i, v0 in enumerate(range(0, n_valid, s)):
        w_s = weight[v0:min(v0 + s, n_valid)]
        dl = dl_buf[:, :padded_width(w_s.shape[0], impl)]  # zero columns past w_s
        fill(h_a, w_s, labels_a, lse_a, g_a, vocab_start + v0, z_loss, dl, key_v=n_valid)
        mm(dl.t(), h_a, grad_weight[v0:v0 + w_s.shape[0]], accumulate, name="grad_weight",
           key_h=h, key_v=n_valid)
        mm(dl, w_s, acc, i > 0, name="grad_hidden", key_h=h, key_v=n_valid)


def _backward(grad_loss, hidden, weight, labels, active, lse, grad_weight, accumulate: bool,
              z_loss: float, vocab_start: int, n_valid: int, group, impl: str,
              vocab_slice: int) -> torch.Tensor:
    """grad_hidden; ``grad_weight`` (``[V_local, H]``) gets ``dloss/dW`` stored or added."""
    idx = active.nonzero().squeeze(1)
    n_a, h = idx.numel(), hidden.shape[1]
    if not accumulate:
        grad_weight[n_valid:].zero_()  # padded rows are never predicted
    pad = -n_a % row_multiple(hidden.device, impl)
    acc = torch.empty(n_a + pad, h, device=hidden.device, dtype=torch.float32)
    if n_a == 0 or n_valid == 0:
        acc.zero_()
        if not accumulate:
            grad_weight.zero_()
    else:
        h_a = hidden.index_select(0, idx)
        labels_a, lse_a = labels.index_select(0, idx), lse.index_select(0, idx)
        g_a = grad_loss.index_select(0, idx).float()
        if pad:  # zero rows with zero upstream gradient: their dlogits rows are exact zeros
            h_a = torch.cat([h_a, h_a.new_zeros(pad, h)])
            labels_a = torch.cat([labels_a, labels_a.new_full((pad,), -1)])
            lse_a, g_a = torch.cat([lse_a, lse_a.new_zeros(pad)]), torch.cat([g_a, g_a.new_zeros(pad)])
        backward_slices(h_a, weight, labels_a, lse_a, g_a, grad_weight, accumulate, acc,
                        z_loss, vocab_start, n_valid, impl, vocab_slice)
    acc = acc[:n_a]
    if group is not None:
        dist.all_reduce(acc, group=group)
    grad_h = torch.zeros_like(hidden)
    grad_h.index_copy_(0, idx, acc.to(hidden.dtype))
    return grad_h


# ============================================================================ custom ops
@torch.library.custom_op("soda_kernels::flce_forward", mutates_args=())
def _flce_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  active: torch.Tensor, z_loss: float, vocab_start: int, num_real_vocab: int,
                  group: str, impl: str, vocab_slice: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_valid = _n_valid(weight, vocab_start, num_real_vocab)
    idx = active.nonzero().squeeze(1)
    h_a, labels_a = hidden.index_select(0, idx), labels.index_select(0, idx)
    if impl == "triton":
        m, s, t = lse_partials_triton(h_a, weight, labels_a, vocab_start, n_valid)
    else:
        m, s, t = lse_partials_torch(h_a, weight, labels_a, vocab_start, n_valid, vocab_slice)
    del h_a
    lse_a, target = combine_across_ranks(m, s, t, resolve_group(group))
    lse = torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    loss = torch.zeros_like(lse)
    lse.index_copy_(0, idx, lse_a)
    loss.index_copy_(0, idx, lse_a - target + z_loss * lse_a * lse_a)
    return loss, lse


@_flce_forward.register_fake
def _(hidden, weight, labels, active, z_loss, vocab_start, num_real_vocab, group, impl,
      vocab_slice):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("soda_kernels::flce_backward", mutates_args=("grad_weight",))
def _flce_backward(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                   labels: torch.Tensor, active: torch.Tensor, lse: torch.Tensor,
                   grad_weight: torch.Tensor, accumulate: bool, z_loss: float,
                   vocab_start: int, num_real_vocab: int, group: str, impl: str,
                   vocab_slice: int) -> torch.Tensor:
    return _backward(grad_loss, hidden, weight, labels, active, lse, grad_weight, accumulate,
                     z_loss, vocab_start, _n_valid(weight, vocab_start, num_real_vocab),
                     resolve_group(group), impl, vocab_slice)


@_flce_backward.register_fake
def _(grad_loss, hidden, weight, labels, active, lse, grad_weight, accumulate, z_loss,
      vocab_start, num_real_vocab, group, impl, vocab_slice):
    return torch.empty_like(hidden)


# ============================================================================ autograd + public
class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd node around the two custom ops; only ``lse [N]`` is saved besides the inputs.

    With ``fuse_main_grad`` (the weight carries Megatron DDP's fp32 ``main_grad`` and its
    ``grad_added_to_main_grad`` flag) the backward adds ``dloss/dW`` into ``main_grad``, sets
    the flag, and returns the weight's own storage as a placeholder gradient: DDP's
    post-accumulate hook then adds nothing (the flag is set) and drops ``.grad``, exactly as
    for Megatron's fused linear layers. (Megatron allocates an uninitialised weight-sized
    placeholder because DDP with ``overlap_grad_reduce`` asserts ``.grad is not None``; an
    alias of the weight satisfies the assertion without allocating.)
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, active, z_loss, vocab_start, num_real_vocab,
                group, impl, vocab_slice, fuse_main_grad):
        loss, lse = torch.ops.soda_kernels.flce_forward(
            hidden, weight, labels, active, z_loss, vocab_start, num_real_vocab, group, impl,
            vocab_slice)
        ctx.save_for_backward(hidden, weight, labels, active, lse)
        ctx.args = (z_loss, vocab_start, num_real_vocab, group, impl, vocab_slice)
        # forward() receives the caller's objects: the Parameter, with its main_grad attribute.
        ctx.param = weight if fuse_main_grad else None
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, labels, active, lse = ctx.saved_tensors
        param = ctx.param
        if param is not None:
            target, accumulate = param.main_grad, True
        else:
            target, accumulate = torch.empty_like(weight), False
        grad_h = torch.ops.soda_kernels.flce_backward(
            grad_loss.contiguous(), hidden, weight, labels, active, lse, target, accumulate,
            *ctx.args)
        if param is not None:
            param.grad_added_to_main_grad = True
            target = weight.detach()  # placeholder, see the class docstring
        return grad_h, target, None, None, None, None, None, None, None, None, None


def fuses_main_grad(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a parameter wrapped by Megatron DDP with an fp32 ``main_grad``."""
    main_grad = getattr(weight, "main_grad", None)
    return (isinstance(weight, torch.nn.Parameter) and hasattr(weight, "grad_added_to_main_grad")
            and isinstance(main_grad, torch.Tensor) and main_grad.dtype == torch.float32
            and main_grad.shape == weight.shape and weight.is_contiguous())


class LinearCrossEntropyOutput(NamedTuple):
    loss: torch.Tensor          # [N] fp32 per-token loss incl. z-loss, 0 where not active
    lse: torch.Tensor           # [N] fp32 logsumexp over the whole (real) vocabulary (fused:
    #                             0 where not active, those rows are never computed)
    group_loss: torch.Tensor    # [G] fp32 sum of loss per loss group
    group_tokens: torch.Tensor  # [G] int64 active tokens per loss group


def active_tokens(labels, loss_mask=None, loss_groups=None, num_real_vocab=None) -> torch.Tensor:
    """Bool ``[N]``: mask non-zero, group >= 0 and label a real vocabulary id."""
    active = labels >= 0
    if num_real_vocab is not None:
        active &= labels < num_real_vocab
    if loss_mask is not None:
        active &= loss_mask != 0
    if loss_groups is not None:
        active &= loss_groups >= 0
    return active


@torch.no_grad()
def loss_group_stats(loss, loss_groups, active, num_groups: int = NUM_LOSS_GROUPS):
    """Per-group ``(sum of loss, token count)``; a one-hot reduction, deterministic on GPU."""
    groups = torch.zeros_like(active, dtype=torch.long) if loss_groups is None else loss_groups.long()
    onehot = (groups[:, None] == torch.arange(num_groups, device=loss.device)) & active[:, None]
    sums = (loss.detach().float()[:, None] * onehot).sum(0)
    return sums, onehot.sum(0)


def _check_inputs(hidden, weight, labels, impl):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V_local, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'triton' or 'torch', got {impl!r}")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    loss_groups: Optional[torch.Tensor] = None,
    *,
    z_loss: float = 0.0,
    num_real_vocab: Optional[int] = None,
    vocab_start: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
    impl: str = "triton",
    vocab_slice: Optional[int] = None,
    fuse_main_grad: bool = True,
    num_groups: int = NUM_LOSS_GROUPS,
    known_grad: Optional[torch.Tensor] = None,
    row_chunk: Optional[int] = None,
) -> LinearCrossEntropyOutput:
    """Per-token ``lse - logit[label] + z * lse^2`` of ``hidden @ weight^T`` without the logits.

    ``weight`` is this TP rank's shard, holding global ids ``[vocab_start, vocab_start +
    V_local)`` (default: ``rank * V_local``, Megatron's equal split); ``num_real_vocab``
    (default: all rows of all ranks) excludes padded rows. ``tp_group`` None means one rank.
    Gradients flow to ``hidden`` (summed over the TP group) and ``weight``; when
    ``fuse_main_grad`` and the weight has Megatron DDP's fp32 ``main_grad``
    (:func:`fuses_main_grad`), the weight gradient is added into ``main_grad`` instead.
    ``vocab_slice`` (default :func:`default_vocab_slice`) sets the backward's slice width.

    ``known_grad`` (``[N]``, the gradient ``loss`` will receive, e.g. the loss mask when the
    caller back-propagates the per-token sum) selects the training path of
    :mod:`soda_kernels.flce_train` when gradients are being recorded and ``grad_W`` can
    accumulate in fp32 (fp32 weights or Megatron's ``main_grad``): the forward computes both
    gradients (three matmuls instead of four, ``row_chunk`` rows at a time, default
    :func:`~soda_kernels.flce_train.default_row_chunk`) and the backward checks the incoming
    gradient against ``known_grad`` (a mismatch is still exact: it costs the recompute).
    """
    _check_inputs(hidden, weight, labels, impl)
    rank, size = group_rank_size(tp_group)
    v_local = weight.shape[0]
    vocab_start = rank * v_local if vocab_start is None else vocab_start
    num_real_vocab = v_local * size if num_real_vocab is None else num_real_vocab
    if num_real_vocab < 1:
        raise ValueError("num_real_vocab must be >= 1")
    active = active_tokens(labels, loss_mask, loss_groups, num_real_vocab)
    n_valid = _n_valid(weight, vocab_start, num_real_vocab)
    if vocab_slice is not None and vocab_slice < 1:
        raise ValueError(f"vocab_slice must be >= 1, got {vocab_slice}")
    cols = vocab_slice or default_vocab_slice(hidden.shape[1], max(n_valid, 1), hidden.device)
    fuse = fuse_main_grad and weight.requires_grad and fuses_main_grad(weight)
    if known_grad is not None and _train_path(hidden, weight, fuse):
        from soda_kernels.flce_train import TrainLinearCrossEntropyFunction, default_row_chunk

        if known_grad.shape != labels.shape:
            raise ValueError(f"known_grad must be [N] = [{labels.shape[0]}], got "
                             f"{tuple(known_grad.shape)}")
        if row_chunk is not None and row_chunk < 1:
            raise ValueError(f"row_chunk must be >= 1, got {row_chunk}")
        rows = row_chunk or default_row_chunk(hidden.shape[1], max(n_valid, 1), weight.dtype,
                                              hidden.device, impl, main_grad=fuse)
        loss, lse = TrainLinearCrossEntropyFunction.apply(
            hidden.contiguous(), weight if fuse else weight.contiguous(), labels.contiguous(),
            active, known_grad.detach().float().contiguous(), float(z_loss), int(vocab_start),
            int(num_real_vocab), register_group(tp_group), impl, int(cols), int(rows), fuse)
        sums, counts = loss_group_stats(loss, loss_groups, active, num_groups)
        return LinearCrossEntropyOutput(loss, lse, sums, counts)
    loss, lse = FusedLinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight if fuse else weight.contiguous(), labels.contiguous(), active,
        float(z_loss), int(vocab_start), int(num_real_vocab), register_group(tp_group), impl,
        int(cols), fuse)
    sums, counts = loss_group_stats(loss, loss_groups, active, num_groups)
    return LinearCrossEntropyOutput(loss, lse, sums, counts)


def _train_path(hidden: torch.Tensor, weight: torch.Tensor, fuse: bool) -> bool:
    """Whether the three-matmul training path applies (see :mod:`soda_kernels.flce_train`):
    gradients are recorded and ``grad_W`` can accumulate in fp32 without a weight-sized copy."""
    needs_grad = hidden.requires_grad or weight.requires_grad
    return (torch.is_grad_enabled() and needs_grad
            and (fuse or (weight.dtype == torch.float32 and hidden.dtype == torch.float32)))


# ============================================================================ reference
def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    loss_groups: Optional[torch.Tensor] = None,
    *,
    z_loss: float = 0.0,
    num_real_vocab: Optional[int] = None,
    vocab_start: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
    compute_dtype: torch.dtype = torch.float32,
    num_groups: int = NUM_LOSS_GROUPS,
) -> LinearCrossEntropyOutput:
    """Plain PyTorch: materialised ``[N, V_local]`` logits in ``compute_dtype``, autograd.

    Same contract as :func:`fused_linear_cross_entropy`; ``compute_dtype=torch.float64`` makes
    it the oracle of the accuracy tests. Outputs are in ``compute_dtype``.
    """
    rank, size = group_rank_size(tp_group)
    v_local = weight.shape[0]
    vocab_start = rank * v_local if vocab_start is None else vocab_start
    num_real_vocab = v_local * size if num_real_vocab is None else num_real_vocab
    active = active_tokens(labels, loss_mask, loss_groups, num_real_vocab)
    h = reduce_backward(hidden, tp_group).to(compute_dtype)
    logits = h @ weight.to(compute_dtype).t()
    real = torch.arange(v_local, device=logits.device) + vocab_start < num_real_vocab
    logits = logits.masked_fill(~real, float("-inf"))
    big = logits.detach().amax(1)
    if tp_group is not None:
        dist.all_reduce(big, op=dist.ReduceOp.MAX, group=tp_group)
    sum_exp = reduce_forward(torch.exp(logits - big[:, None]).sum(1), tp_group)
    lse = big + torch.log(sum_exp)
    local = labels.long() - vocab_start
    inside = (local >= 0) & (local < v_local) & active
    picked = logits.gather(1, local.clamp(0, v_local - 1)[:, None]).squeeze(1)
    target = reduce_forward(torch.where(inside, picked, torch.zeros_like(picked)), tp_group)
    loss = torch.where(active, lse - target + z_loss * lse * lse, torch.zeros_like(lse))
    sums, counts = loss_group_stats(loss, loss_groups, active, num_groups)
    return LinearCrossEntropyOutput(loss, lse.detach(), sums.to(compute_dtype), counts)
