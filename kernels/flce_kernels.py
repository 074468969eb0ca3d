"""The ``@triton.jit`` kernels of the fused linear cross-entropy (no host code).

Recompute path (:mod:`.fused_linear_cross_entropy`): ``_lse_partials_kernel`` (forward:
online logsumexp over vocabulary tiles), ``_grad_logits_kernel`` (backward: recomputed logits
-> ``dlogits`` slice), ``_matmul_kernel`` / ``_matmul_tma_kernel`` (``grad_W`` and ``grad_h``).
Training path (:mod:`.flce_train`): ``_chunk_stats_kernel`` and ``_chunk_dlogits_kernel``, two
memory-bound passes over a chunk's fp32 logits. The online ``(max, sum-exp, target)`` update
is one helper, :func:`_online_lse_step`, shared by the forward and the chunk statistics.
Launchers, tiles and tuning live in :mod:`.flce_ops` and :mod:`.flce_tuning`.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _online_lse_step(x, ok, cols, target, m, s, t):
    """One tile of the online logsumexp: the fp32 logits tile ``x [rows, cols]`` (entries
    where ``ok`` is false do not count) updates each row's running max ``m``, sum-exp ``s``
    (relative to ``m``) and target logit ``t`` (``target``: the label's column, in the same
    numbering as ``cols``). Returns the new ``(m, s, t)``."""
    x = tl.where(ok, x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, axis=1))
    # NOTE: a row with nothing counted yet keeps m = -inf, and exp(-inf - -inf) is NaN:
    # shift by a finite stand-in there (its s stays 0). Elsewhere safe == m_new, bitwise.
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - safe) + tl.sum(tl.exp(x - safe[:, None]), axis=1)
    hit = (cols[None, :] == target[:, None]) & ok
    t += tl.sum(tl.where(hit, x, 0.0), axis=1)
    return m_new, s, t


@triton.jit
def _stats_start(label_ptr, N, n_cols, vocab_start, splits, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """This program's rows (``program_id(0)``), their target columns and column range of split
    ``program_id(1)`` (of ``splits`` over ``n_cols``), and the empty online statistics."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    target = tl.load(label_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
    cols_per_split = tl.cdiv(tl.cdiv(n_cols, BLOCK_V), splits) * BLOCK_V
    v_lo = tl.program_id(1) * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, n_cols)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    return rows, row_ok, target, v_lo, v_hi, m, s, t


@triton.jit
def _stats_store(m_ptr, s_ptr, t_ptr, rows, row_ok, N, m, s, t):
    """Store this split's statistics at ``[program_id(1), rows]`` of the ``[splits, N]`` outputs."""
    out = tl.program_id(1) * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)


@triton.jit
def _lse_partials_kernel(h_ptr, w_ptr, label_ptr, m_ptr, s_ptr, t_ptr,
                         N, H, n_valid, vocab_start, splits, stride_h, stride_w,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Per (row tile, vocabulary split): online max / sum-exp / target logit, fp32."""
    rows, row_ok, target, v_lo, v_hi, m, s, t = _stats_start(label_ptr, N, n_valid, vocab_start,
                                                             splits, BLOCK_N, BLOCK_V)
    # NOTE: flatten=True makes Triton's pipeliner fuse this loop with the H loop inside
    # _logits_tile into one software-pipelined loop: the next V tile's loads are in flight
    # while this tile's softmax runs, instead of a drain and a new prologue per V tile
    # (compile_check: one main loop, not nested).
    for v0 in tl.range(v_lo, v_hi, BLOCK_V, flatten=True):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        x = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        m, s, t = _online_lse_step(x, col_ok[None, :], cols, target, m, s, t)
    _stats_store(m_ptr, s_ptr, t_ptr, rows, row_ok, N, m, s, t)


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
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, A_M, A_K, C_N, stride_am, stride_ak, stride_bk,
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
    c_ok = m_ok[:, None] & (rn < C_N)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _matmul_tma_kernel(a_ptr, b_ptr, c_ptr, M, N, K, A_M, A_K, C_N, stride_am, stride_ak, stride_bk,
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
    c_ok = (rm < M)[:, None] & (rn < C_N)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_ok)



# ============================================================================ training path's chunk kernels
@triton.jit
def _chunk_stats_kernel(x_ptr, label_ptr, m_ptr, s_ptr, t_ptr, C, V, n_load, vocab_start, splits,
                        stride_x, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per (row tile, column split) of the fp32 logits chunk ``x [C, V]``: online max,
    sum-exp and target logit (0 where the target is elsewhere), fp32. Loads are bounded by
    ``n_load >= V`` (the buffer's 16-divisible width: vectorised loads); columns past ``V``
    do not count."""
    rows, row_ok, target, v_lo, v_hi, m, s, t = _stats_start(label_ptr, C, V, vocab_start, splits,
                                                             BLOCK_N, BLOCK_V)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols < n_load)[None, :],
                    other=float("-inf"))
        m, s, t = _online_lse_step(x, row_ok[:, None] & (cols < v_hi)[None, :], cols, target,
                                   m, s, t)
    _stats_store(m_ptr, s_ptr, t_ptr, rows, row_ok, C, m, s, t)


@triton.jit
def _chunk_dlogits_kernel(x_ptr, dl_ptr, label_ptr, lse_ptr, g_ptr, C, V, n_store, vocab_start,
                          z_loss, stride_x, stride_dl, BLOCK_N: tl.constexpr,
                          BLOCK_V: tl.constexpr):
    """``dl[n, v] = g_n (exp(x[n, v] - lse_n) (1 + 2 z lse_n) - [v == y_n])`` for one tile of
    the chunk's ``V`` columns; columns ``[V, n_store)`` of ``dl`` get exact zeros (the padding
    that keeps the gradient matmuls' bounds 16-divisible; ``x`` must be readable there). ``dl``
    may be ``x`` itself (fp32, in place) or a 16-bit buffer."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < C
    ok = row_ok[:, None] & (cols < V)[None, :]
    stored = row_ok[:, None] & (cols < n_store)[None, :]
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    target = tl.load(label_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
    # NOTE: loaded up to n_store (16-divisible: vectorised loads); columns past V discarded.
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=stored,
                other=0.0)
    d = tl.exp(x - lse[:, None]) * (g * (1.0 + 2.0 * z_loss * lse))[:, None]
    d = d - tl.where(cols[None, :] == target[:, None], g[:, None], 0.0)
    d = tl.where((g != 0.0)[:, None] & ok, d, 0.0)
    ptrs = dl_ptr + rows.to(tl.int64)[:, None] * stride_dl + cols[None, :]
    tl.store(ptrs, d.to(dl_ptr.dtype.element_ty), mask=stored)
