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

Shapes: hidden ``[N, H]``, weight ``[V_local, H]`` (same dtype: fp32, or bf16/fp16 with fp32
accumulation), labels / loss_mask / loss_groups ``[N]``. Outputs: loss ``[N]`` fp32, lse
``[N]`` fp32, group_loss ``[G]`` fp32, group_tokens ``[G]`` int64.

How (``impl="triton"``):

* forward: ``_lse_partials_kernel`` runs on a grid of (row tiles x vocabulary splits); each
  program streams its columns in ``BLOCK_V`` tiles, computes the logit tile with ``tl.dot``
  over ``BLOCK_H`` slices of H, and keeps an online logsumexp ``(max, sum-exp)`` and the
  target logit in fp32 registers. The splits are merged, then the ranks: one all-reduce MAX
  of the max and one all-reduce SUM of ``[sum-exp rescaled, target logit]`` (Megatron's
  ``vocab_parallel_cross_entropy`` does the same with three all-reduces over materialised
  logits). Only ``lse`` ``[N]`` is kept for backward.
* backward: rows are processed in chunks; ``_grad_logits_kernel`` recomputes the chunk's
  logit tiles and writes ``dloss/dlogits`` ``[rows, V_valid]`` in the weight dtype, then two
  cuBLAS matmuls give ``grad_hidden[chunk] = dlogits @ W`` and ``grad_W += dlogits^T @ h``
  (fp32 accumulator). ``grad_hidden`` is all-reduced over TP, as the input gradient of a
  column-parallel linear. No atomics: the result is deterministic.

Memory saved: the ``[N, V_local]`` logits (fp32 in Megatron's loss: 9.5 GB at N = 16384,
V = 144,644) and their softmax copy never exist; the forward keeps O(N) statistics, the
backward one ``[chunk_rows, V_valid]`` buffer (``chunk_rows`` defaults to about N*H/V rows,
at least 256: the size of the hidden states, e.g. 74 MB in bf16 at V = 144,644) plus an fp32
``grad_W`` accumulator when weights are not fp32.

``impl="torch"`` is the same algorithm in plain PyTorch (chunked ``[chunk_rows, V_valid]``
fp32 logits, logits rounded to the weight dtype by the matmul, as Megatron's path does);
:func:`fused_linear_cross_entropy_reference` materialises all logits in fp32 (or fp64) and
uses autograd: it is the ground truth for tests and benchmarks.

Both implementations are ``torch.library`` custom ops (``soda_kernels::flce_forward`` /
``flce_backward``) with fake (meta) functions, called from a ``torch.autograd.Function``, so
``torch.compile(fullgraph=True)`` traces through them without a graph break. The TP group
crosses the op boundary as its name (see :mod:`._vocab_parallel`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

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


# ============================================================================ Triton kernels
@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 UPCAST: tl.constexpr, IEEE: tl.constexpr):
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
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _lse_partials_kernel(h_ptr, w_ptr, label_ptr, m_ptr, s_ptr, t_ptr,
                         N, H, n_valid, vocab_start, cols_per_split, stride_h, stride_w,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                         UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Per (row tile, vocabulary split): online max / sum-exp / target logit, fp32."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    target = tl.load(label_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, n_valid)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        x = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, IEEE)
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
                        N, H, n_valid, vocab_start, z_loss, stride_h, stride_w, stride_dl,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``dl[n, v] = g_n * (softmax_n,v * (1 + 2 z lse_n) - [v == y_n])`` for one tile."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < n_valid
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    target = tl.load(label_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
    x = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, IEEE)
    p = tl.exp(x - lse[:, None])
    d = p * (1.0 + 2.0 * z_loss * lse)[:, None]
    d = d - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    # NOTE: where() rather than multiply, so inactive rows (g = 0) stay 0 even if p overflowed.
    d = tl.where((g != 0.0)[:, None], d * g[:, None], 0.0)
    ptrs = dl_ptr + rows.to(tl.int64)[:, None] * stride_dl + cols[None, :]
    tl.store(ptrs, d.to(dl_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ============================================================================ launchers
def _blocks(device: torch.device) -> dict:
    # NOTE: not autotuned yet (no GPU in the session that wrote this); 64x128x64 with 8 warps
    # is the usual starting point for fp32-accumulating bf16 tiles on A100/H100. Under the CPU
    # interpreter, cost grows with the number of programs, so tiles are kept few.
    if device.type == "cuda":
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
    return dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=32)


def _dtype_flags(x: torch.Tensor) -> dict:
    return dict(UPCAST=interpreting() and x.dtype != torch.float32, IEEE=x.dtype == torch.float32)


def lse_partials_triton(hidden, weight, labels, vocab_start: int, n_valid: int,
                        splits: Optional[int] = None, blocks: Optional[dict] = None):
    """This rank's ``(max, sum-exp, target logit)`` per row over columns ``[0, n_valid)``."""
    check_triton_tensors(hidden, weight, labels)
    n, h = hidden.shape
    cfg = dict(blocks or _blocks(hidden.device))
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    row_tiles = triton.cdiv(n, bn)
    col_tiles = max(triton.cdiv(n_valid, bv), 1)
    if splits is None:
        if hidden.device.type == "cuda":
            sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
            splits = triton.cdiv(4 * sms, row_tiles)
        else:
            splits = 1
    splits = max(1, min(splits, col_tiles))
    cols_per_split = triton.cdiv(col_tiles, splits) * bv
    stats = torch.empty(3, splits, n, device=hidden.device, dtype=torch.float32)
    _lse_partials_kernel[(row_tiles, splits)](
        hidden, weight, labels, stats[0], stats[1], stats[2],
        n, h, n_valid, vocab_start, cols_per_split, hidden.stride(0), weight.stride(0),
        **_dtype_flags(hidden), **cfg)
    return merge_partials(stats[0], stats[1], stats[2], dim=0)


def lse_partials_torch(hidden, weight, labels, vocab_start: int, n_valid: int, chunk_rows: int):
    """Same statistics as :func:`lse_partials_triton`, from ``[chunk_rows, n_valid]`` logits."""
    n = hidden.shape[0]
    m = torch.full((n,), float("-inf"), device=hidden.device)
    s = torch.zeros(n, device=hidden.device)
    t = torch.zeros(n, device=hidden.device)
    if n_valid == 0:
        return m, s, t
    w = weight[:n_valid]
    for r0 in range(0, n, chunk_rows):
        x = (hidden[r0:r0 + chunk_rows] @ w.t()).float()
        m[r0:r0 + x.shape[0]] = x.amax(1)
        s[r0:r0 + x.shape[0]] = torch.exp(x - m[r0:r0 + x.shape[0], None]).sum(1)
        local = labels[r0:r0 + chunk_rows].long() - vocab_start
        inside = (local >= 0) & (local < n_valid)
        picked = x.gather(1, local.clamp(0, n_valid - 1)[:, None]).squeeze(1)
        t[r0:r0 + x.shape[0]] = torch.where(inside, picked, torch.zeros_like(picked))
    return m, s, t


def grad_logits_triton(h_c, weight, labels_c, lse_c, g_c, vocab_start, n_valid, z_loss, out,
                       blocks: Optional[dict] = None):
    """Fill ``out`` (``[rows, n_valid]``, weight dtype) with ``dloss/dlogits`` of a row chunk."""
    check_triton_tensors(h_c, weight)
    cfg = dict(blocks or _blocks(h_c.device))
    rows = h_c.shape[0]
    # NOTE: Triton 3.8's interpreter truncates fp32 -> bf16 stores (GPUs round to nearest
    # even); there the kernel writes fp32 and torch rounds.
    dest = out if out.dtype == torch.float32 or not interpreting() else out.float()
    grid = (triton.cdiv(rows, cfg["BLOCK_N"]), triton.cdiv(n_valid, cfg["BLOCK_V"]))
    _grad_logits_kernel[grid](
        h_c, weight, labels_c, lse_c, g_c, dest,
        rows, h_c.shape[1], n_valid, vocab_start, float(z_loss),
        h_c.stride(0), weight.stride(0), dest.stride(0), **_dtype_flags(h_c), **cfg)
    if dest is not out:
        out.copy_(dest)
    return out


def grad_logits_torch(h_c, weight, labels_c, lse_c, g_c, vocab_start, n_valid, z_loss, out):
    x = (h_c @ weight[:n_valid].t()).float()
    d = torch.exp(x - lse_c[:, None]) * (1.0 + 2.0 * z_loss * lse_c)[:, None]
    local = labels_c.long() - vocab_start
    inside = (local >= 0) & (local < n_valid)
    d.scatter_add_(1, local.clamp(0, n_valid - 1)[:, None], -inside.to(d.dtype)[:, None])
    d = torch.where((g_c != 0)[:, None], d * g_c[:, None], torch.zeros_like(d))
    out.copy_(d)
    return out


def default_chunk_rows(n: int, h: int, n_valid: int) -> int:
    """Backward row chunk: a ``[rows, V]`` buffer about the size of ``[N, H]``, >= 256 rows."""
    rows = triton.next_power_of_2(triton.cdiv(n * h, max(n_valid, 1)))
    return max(1, min(n, max(rows, 256)))


def _n_valid(weight: torch.Tensor, vocab_start: int, num_real_vocab: int) -> int:
    return max(0, min(weight.shape[0], num_real_vocab - vocab_start))


# ============================================================================ custom ops
@torch.library.custom_op("soda_kernels::flce_forward", mutates_args=())
def _flce_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  active: torch.Tensor, z_loss: float, vocab_start: int, num_real_vocab: int,
                  group: str, impl: str, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_valid = _n_valid(weight, vocab_start, num_real_vocab)
    if impl == "triton":
        m, s, t = lse_partials_triton(hidden, weight, labels, vocab_start, n_valid)
    else:
        m, s, t = lse_partials_torch(hidden, weight, labels, vocab_start, n_valid, chunk_rows)
    lse, target = combine_across_ranks(m, s, t, resolve_group(group))
    loss = lse - target + z_loss * lse * lse
    return torch.where(active, loss, torch.zeros_like(loss)), lse


@_flce_forward.register_fake
def _(hidden, weight, labels, active, z_loss, vocab_start, num_real_vocab, group, impl, chunk_rows):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("soda_kernels::flce_backward", mutates_args=())
def _flce_backward(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                   labels: torch.Tensor, active: torch.Tensor, lse: torch.Tensor, z_loss: float,
                   vocab_start: int, num_real_vocab: int, group: str, impl: str,
                   chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_valid = _n_valid(weight, vocab_start, num_real_vocab)
    g = torch.where(active, grad_loss.float(), torch.zeros_like(lse))
    grad_h = torch.zeros_like(hidden)
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
    if n_valid > 0:
        w = weight[:n_valid]
        buf = torch.empty(min(chunk_rows, hidden.shape[0]), n_valid, device=weight.device,
                          dtype=weight.dtype)
        fill = grad_logits_triton if impl == "triton" else grad_logits_torch
        for r0 in range(0, hidden.shape[0], chunk_rows):
            h_c = hidden[r0:r0 + chunk_rows]
            dl = buf[:h_c.shape[0]]
            fill(h_c, weight, labels[r0:r0 + chunk_rows], lse[r0:r0 + chunk_rows],
                 g[r0:r0 + chunk_rows], vocab_start, n_valid, z_loss, dl)
            torch.mm(dl, w, out=grad_h[r0:r0 + h_c.shape[0]])
            grad_w[:n_valid] += torch.mm(dl.t(), h_c).float()
    grp = resolve_group(group)
    if grp is not None:
        dist.all_reduce(grad_h, group=grp)
    return grad_h, grad_w.to(weight.dtype)


@_flce_backward.register_fake
def _(grad_loss, hidden, weight, labels, active, lse, z_loss, vocab_start, num_real_vocab,
      group, impl, chunk_rows):
    return torch.empty_like(hidden), torch.empty_like(weight)


# ============================================================================ autograd + public
class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd node around the two custom ops; only ``lse [N]`` is saved besides the inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, active, z_loss, vocab_start, num_real_vocab,
                group, impl, chunk_rows):
        loss, lse = torch.ops.soda_kernels.flce_forward(
            hidden, weight, labels, active, z_loss, vocab_start, num_real_vocab, group, impl,
            chunk_rows)
        ctx.save_for_backward(hidden, weight, labels, active, lse)
        ctx.args = (z_loss, vocab_start, num_real_vocab, group, impl, chunk_rows)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, labels, active, lse = ctx.saved_tensors
        grad_h, grad_w = torch.ops.soda_kernels.flce_backward(
            grad_loss.contiguous(), hidden, weight, labels, active, lse, *ctx.args)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


class LinearCrossEntropyOutput(NamedTuple):
    loss: torch.Tensor          # [N] fp32 per-token loss incl. z-loss, 0 where not active
    lse: torch.Tensor           # [N] fp32 logsumexp over the whole (real) vocabulary
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
    chunk_rows: Optional[int] = None,
    num_groups: int = NUM_LOSS_GROUPS,
) -> LinearCrossEntropyOutput:
    """Per-token ``lse - logit[label] + z * lse^2`` of ``hidden @ weight^T`` without the logits.

    ``weight`` is this TP rank's shard, holding global ids ``[vocab_start, vocab_start +
    V_local)`` (default: ``rank * V_local``, Megatron's equal split); ``num_real_vocab``
    (default: all rows of all ranks) excludes padded rows. ``tp_group`` None means one rank.
    Gradients flow to ``hidden`` (summed over the TP group) and ``weight``.
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
    rows = chunk_rows or default_chunk_rows(hidden.shape[0], hidden.shape[1], max(n_valid, 1))
    loss, lse = FusedLinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight.contiguous(), labels.contiguous(), active, float(z_loss),
        int(vocab_start), int(num_real_vocab), register_group(tp_group), impl, int(rows))
    sums, counts = loss_group_stats(loss, loss_groups, active, num_groups)
    return LinearCrossEntropyOutput(loss, lse, sums, counts)


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
