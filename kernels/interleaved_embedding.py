"""Vocabulary-parallel embedding lookup that also emits each position's modality.

Math: TP rank r holds rows ``[vocab_start, vocab_start + V_local)`` of the embedding table
``E`` (``weight``, ``[V_local, H]``). For token ids ``x`` (any shape ``[*]``)::

    out[p] = sum over ranks of ( E[x_p - vocab_start] if x_p is in this rank's range else 0 )
    modality[p] = 0 text | 1 special | 2 + k audio codebook k | -1 outside the vocabulary

(the codes of ``soda_mega.tokens.Modality``, computed from the layout's numbers, passed as
ints so this module stays independent of the library). The backward is
``grad_E[v] = sum_{p: x_p = v} grad_out[p]``.

Why fused: Megatron's ``VocabParallelEmbedding`` makes a range mask, a shifted copy of the
ids, the gather and a masked zero-fill (several passes over ``[*, H]``), and modality ids
need another pass over the ids. ``_embedding_fwd_kernel`` does the range check, gather, zero
fill and modality in one pass; the TP all-reduce follows (the caller may instead
reduce-scatter for sequence parallelism, as Megatron does).

Deterministic backward with bounded work per program: the local ids are stably sorted (ids
of other ranks get the sentinel ``V_local`` and sort last) and cut into fixed pieces of
``piece`` sorted positions (64 on a GPU). ``_embedding_bwd_pieces_kernel`` runs one program per
(piece, H block) and sums the gradient rows of each run of equal ids in the piece in fp32
(a segmented sum done as one exact 0/1 matmul: on the tensor cores in the gradient's own
dtype for bf16 / fp16, since a 0/1 factor makes every product exact; IEEE fp32 for fp32): a
run that starts and ends inside the piece is written to its row directly; the part of a run
that crosses a piece boundary becomes a partial sum (``tail`` of the piece where the run
starts, ``head`` of each later piece it covers). ``_embedding_bwd_merge_kernel`` then
completes each crossing run from the piece where it starts: its tail plus the heads of the
following pieces, in piece order. Every program touches at most ``piece`` gradient rows (the
merge, ``run length / piece`` partials), so an id repeated thousands of times (silence codes,
specials) no longer makes one program walk the whole run; the summation order is fixed, so
the same inputs give the same bits. Rows not looked up get exact zeros. Memory: the ``[N]``
sort keys and permutation and two fp32 ``[N / piece, H]`` partial buffers.

For comparison: torch's own CUDA embedding backward (``embedding_dense_backward_cuda``) is
also sort-based and deterministic for more than 3072 indices, the SODA case (8k-16k tokens
per micro-batch), so determinism is not what this kernel adds over it; ``index_add_`` on
CUDA does use atomics. Benchmarks compare against torch's backward as it is
(``benchmarks/bench_kernels.py``).

Both directions are ``torch.library`` custom ops with fake functions, called from a
``torch.autograd.Function``; :func:`interleaved_embedding_reference` is plain PyTorch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from soda_kernels._launch import gpu_like, launch
from soda_kernels._vocab_parallel import (
    check_triton_tensors,
    group_rank_size,
    interpreting,
    reduce_forward,
    register_group,
    resolve_group,
)


# ============================================================================ Triton kernels
@triton.jit
def _embedding_fwd_kernel(ids_ptr, w_ptr, out_ptr, mod_ptr, N, H, V_local, vocab_start,
                          text_vocab_size, audio_base, codebook_size, vocab_size,
                          stride_w, stride_out, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    local = ids - vocab_start
    inside = (local >= 0) & (local < V_local) & row_ok
    local = tl.where(inside, local, 0)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    vals = tl.load(w_ptr + local[:, None] * stride_w + cols[None, :],
                   mask=inside[:, None] & col_ok[None, :], other=0.0)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, vals, mask=row_ok[:, None] & col_ok[None, :])
    if pid_h == 0:
        codebook = (ids - audio_base) // codebook_size  # only used where ids >= audio_base
        mod = tl.where(ids < text_vocab_size, 0, tl.where(ids < audio_base, 1, 2 + codebook))
        mod = tl.where((ids < 0) | (ids >= vocab_size), -1, mod)
        tl.store(mod_ptr + rows, mod.to(tl.int8), mask=row_ok)


@triton.jit
def _embedding_bwd_pieces_kernel(keys_ptr, perm_ptr, grad_ptr, dw_ptr, head_ptr, tail_ptr,
                                 N, H, V_local, stride_g, stride_dw, stride_p,
                                 PIECE: tl.constexpr, BLOCK_H: tl.constexpr,
                                 UPCAST: tl.constexpr):
    """One piece of ``PIECE`` sorted positions: whole runs to ``dw``, crossing runs to partials.

    Segmented sum as one matmul: ``S[r] = sum_j [run_j == r] G[j]`` with ``run_j`` the
    piece-local run index (a prefix sum of run starts) and an exact 0/1 matrix, accumulated in
    fp32 in a fixed order. bf16 / fp16 gradients multiply in their own dtype on the tensor
    cores (a 0/1 factor makes every product exact); fp32 gradients use IEEE fp32 (TF32 would
    round them). Keys are handled as int32 (``V_local < 2**31``), which with the 16-bit operands
    keeps the kernel within its registers (``compile_check``: no spills).
    """
    c = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    lo = c * PIECE
    pos = lo + tl.arange(0, PIECE)
    inside = pos < N
    key = tl.load(keys_ptr + pos, mask=inside, other=-2).to(tl.int32)
    prev = tl.load(keys_ptr + pos - 1, mask=inside & (pos > lo), other=-2).to(tl.int32)
    start = ((key != prev) | (pos == lo)) & inside
    run = tl.cumsum(start.to(tl.int32), axis=0) - 1
    rows = tl.load(perm_ptr + pos, mask=inside, other=0).to(tl.int64)
    g = tl.load(grad_ptr + rows[:, None] * stride_g + cols[None, :],
                mask=inside[:, None] & col_ok[None, :], other=0.0)
    r = tl.arange(0, PIECE)
    member = (run[None, :] == r[:, None]) & inside[None, :]  # [run r, position j]
    if UPCAST or grad_ptr.dtype.element_ty == tl.float32:
        # NOTE: the interpreter's bf16 tl.dot is wrong (see fused_linear_cross_entropy); the
        # upcast values are the same, so the result equals the GPU's 16-bit MMA.
        sums = tl.dot(member.to(tl.float32), g.to(tl.float32), input_precision="ieee")
    else:
        sums = tl.dot(member.to(g.dtype), g, out_dtype=tl.float32)
    run_key = tl.sum(tl.where(member & start[None, :], key[None, :], 0), axis=1)
    n_runs = tl.max(run, axis=0) + 1
    hi = tl.minimum(lo + PIECE, N)
    # NOTE: scalar loads are clamped in range and then selected, rather than masked: a scalar
    # mask is rejected by Triton's interpreter (3.9) and buys nothing on the GPU.
    before = tl.load(keys_ptr + tl.maximum(lo - 1, 0)).to(tl.int32)
    before = tl.where(lo > 0, before, -1)
    after = tl.load(keys_ptr + tl.minimum(hi, N - 1)).to(tl.int32)
    after = tl.where(hi < N, after, -1)
    head = (r == 0) & (run_key == before)            # started in an earlier piece
    tail = (r == n_runs - 1) & (run_key == after) & ~head  # continues into the next piece
    whole = (r < n_runs) & ~head & ~tail & (run_key < V_local)
    ok = col_ok[None, :]
    part = c * stride_p + cols[None, :] + r[:, None] * 0
    tl.store(head_ptr + part, sums, mask=head[:, None] & ok)
    tl.store(tail_ptr + part, sums, mask=tail[:, None] & ok)
    tl.store(dw_ptr + run_key.to(tl.int64)[:, None] * stride_dw + cols[None, :],
             sums.to(dw_ptr.dtype.element_ty), mask=whole[:, None] & ok)


@triton.jit
def _embedding_bwd_merge_kernel(keys_ptr, dw_ptr, head_ptr, tail_ptr, N, H, V_local,
                                stride_dw, stride_p, PIECE: tl.constexpr,
                                BLOCK_H: tl.constexpr):
    """Per piece whose last run starts in it and crosses its end: tail + following heads."""
    c = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    lo = c * PIECE
    hi = tl.minimum(lo + PIECE, N)
    key = tl.load(keys_ptr + hi - 1)
    after = tl.load(keys_ptr + tl.minimum(hi, N - 1))
    after = tl.where(hi < N, after, -1)
    before = tl.load(keys_ptr + tl.maximum(lo - 1, 0))
    before = tl.where(lo > 0, before, -1)
    first = tl.load(keys_ptr + lo)
    starts_here = (first != key) | (before != key)
    if (key == after) & starts_here & (key < V_local):
        acc = tl.load(tail_ptr + c * stride_p + cols, mask=col_ok, other=0.0)
        d = c + 1
        go = True
        while go:
            acc += tl.load(head_ptr + d * stride_p + cols, mask=col_ok, other=0.0)
            end = tl.minimum((d + 1) * PIECE, N)
            nxt = tl.load(keys_ptr + tl.minimum(end, N - 1))
            go = (end < N) & (nxt == key)
            d += 1
        tl.store(dw_ptr + key.to(tl.int64) * stride_dw + cols, acc.to(dw_ptr.dtype.element_ty),
                 mask=col_ok)


# ============================================================================ launchers
def _block_h(h: int, device: torch.device) -> int:
    return min(triton.next_power_of_2(h), 256 if device.type == "cuda" else 128)


def embedding_forward_triton(ids, weight, vocab_start, text_vocab_size, audio_base,
                             codebook_size, num_codebooks, block_n: int | None = None,
                             block_h: int | None = None):
    """Local lookup (zeros outside this rank's rows) and modality ids, flat ``ids [N]``."""
    check_triton_tensors(ids, weight)
    n = ids.numel()
    v_local, h = weight.shape
    out = torch.empty(n, h, device=weight.device, dtype=weight.dtype)
    modality = torch.empty(n, device=ids.device, dtype=torch.int8)
    bn = block_n or (32 if weight.device.type == "cuda" else 64)
    bh = block_h or _block_h(h, weight.device)
    vocab_size = audio_base + num_codebooks * codebook_size
    grid = (triton.cdiv(n, bn), triton.cdiv(h, bh))
    _embedding_fwd_kernel[grid](ids, weight, out, modality, n, h, v_local, vocab_start,
                                text_vocab_size, audio_base, codebook_size, vocab_size,
                                weight.stride(0), out.stride(0), BLOCK_N=bn, BLOCK_H=bh)
    return out, modality


def _piece(device: torch.device) -> int:
    """Sorted positions per backward program: the bound on its work (a [piece, piece] x
    [piece, BLOCK_H] matmul). Small on the GPU (registers), large in the interpreter."""
    return 64 if gpu_like(device) else 512


def _bwd_block_h(h: int, device: torch.device) -> int:
    return max(16, min(triton.next_power_of_2(h), 64 if gpu_like(device) else 128))


def embedding_backward_triton(grad, ids, vocab_start: int, num_rows: int,
                              block_h: int | None = None, piece: int | None = None):
    """Deterministic ``grad_weight [num_rows, H]`` from ``grad [N, H]`` and flat ``ids [N]``."""
    check_triton_tensors(grad, ids)
    n, h = grad.shape
    local = ids.long() - vocab_start
    keys = torch.where((local >= 0) & (local < num_rows), local, torch.full_like(local, num_rows))
    keys, perm = torch.sort(keys, stable=True)
    # NOTE: Triton 3.8's interpreter truncates fp32 -> bf16 stores (GPUs round to nearest
    # even); there the kernel writes fp32 and torch rounds.
    store_dtype = torch.float32 if interpreting() else grad.dtype
    grad_w = torch.zeros(num_rows, h, device=grad.device, dtype=store_dtype)
    if n > 0:
        bh = block_h or _bwd_block_h(h, grad.device)
        piece = piece or max(16, min(_piece(grad.device), triton.next_power_of_2(n)))
        pieces = triton.cdiv(n, piece)
        partial = torch.empty(2, pieces, h, device=grad.device, dtype=torch.float32)
        grid = (pieces, triton.cdiv(h, bh))
        blocks = dict(PIECE=piece, BLOCK_H=bh, num_warps=4, num_stages=1)
        launch("embedding_pieces", _embedding_bwd_pieces_kernel, grid,
               (keys, perm, grad, grad_w, partial[0], partial[1], n, h, num_rows,
                grad.stride(0), grad_w.stride(0), partial.stride(1)),
               dict(blocks, UPCAST=interpreting() and grad.dtype != torch.float32))
        if pieces > 1:
            launch("embedding_merge", _embedding_bwd_merge_kernel, (pieces - 1, triton.cdiv(h, bh)),
                   (keys, grad_w, partial[0], partial[1], n, h, num_rows, grad_w.stride(0),
                    partial.stride(1)), blocks)
    return grad_w.to(grad.dtype)


# ============================================================================ custom ops
@torch.library.custom_op("soda_kernels::embedding_forward", mutates_args=())
def _embedding_forward(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int,
                       text_vocab_size: int, audio_base: int, codebook_size: int,
                       num_codebooks: int, group: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, modality = embedding_forward_triton(ids.reshape(-1), weight, vocab_start,
                                             text_vocab_size, audio_base, codebook_size,
                                             num_codebooks)
    grp = resolve_group(group)
    if grp is not None:
        dist.all_reduce(out, group=grp)
    return out.view(*ids.shape, weight.shape[1]), modality.view(ids.shape)


@_embedding_forward.register_fake
def _(ids, weight, vocab_start, text_vocab_size, audio_base, codebook_size, num_codebooks, group):
    return (weight.new_empty(*ids.shape, weight.shape[1]),
            ids.new_empty(ids.shape, dtype=torch.int8))


@torch.library.custom_op("soda_kernels::embedding_backward", mutates_args=())
def _embedding_backward(grad: torch.Tensor, ids: torch.Tensor, vocab_start: int,
                        num_rows: int) -> torch.Tensor:
    return embedding_backward_triton(grad.reshape(-1, grad.shape[-1]), ids.reshape(-1),
                                     vocab_start, num_rows)


@_embedding_backward.register_fake
def _(grad, ids, vocab_start, num_rows):
    return grad.new_empty(num_rows, grad.shape[-1])


# ============================================================================ autograd + public
class InterleavedEmbeddingFunction(torch.autograd.Function):
    """Forward: fused lookup (+ TP all-reduce). Backward: sorted segment sum (identity over TP,
    since the all-reduced output is replicated on every rank)."""

    @staticmethod
    def forward(ctx, ids, weight, vocab_start, text_vocab_size, audio_base, codebook_size,
                num_codebooks, group):
        out, modality = torch.ops.soda_kernels.embedding_forward(
            ids, weight, vocab_start, text_vocab_size, audio_base, codebook_size, num_codebooks,
            group)
        ctx.save_for_backward(ids)
        ctx.vocab_start, ctx.num_rows = vocab_start, weight.shape[0]
        ctx.mark_non_differentiable(modality)
        return out, modality

    @staticmethod
    def backward(ctx, grad_out, grad_modality):
        (ids,) = ctx.saved_tensors
        grad_w = torch.ops.soda_kernels.embedding_backward(
            grad_out.contiguous(), ids, ctx.vocab_start, ctx.num_rows)
        return None, grad_w, None, None, None, None, None, None


class EmbeddingOutput(NamedTuple):
    embeddings: torch.Tensor  # [*, H], weight dtype
    modality: torch.Tensor    # [*] int8 (soda_mega.tokens.Modality codes)


def _resolve(weight, vocab_start, tp_group):
    rank, _ = group_rank_size(tp_group)
    return rank * weight.shape[0] if vocab_start is None else vocab_start


def interleaved_embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    *,
    text_vocab_size: int,
    audio_base: int,
    codebook_size: int,
    num_codebooks: int,
    vocab_start: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> EmbeddingOutput:
    """Embeddings of ``ids`` from this rank's rows, summed over ``tp_group``, and modalities.

    ``vocab_start`` defaults to ``rank * V_local`` (Megatron's equal split). With
    ``tp_group=None`` the output holds only this rank's rows (zeros elsewhere), for callers
    that reduce themselves (e.g. reduce-scatter under sequence parallelism).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V_local, H], got {tuple(weight.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
    out, modality = InterleavedEmbeddingFunction.apply(
        ids.contiguous(), weight.contiguous(), int(_resolve(weight, vocab_start, tp_group)),
        int(text_vocab_size), int(audio_base), int(codebook_size), int(num_codebooks),
        register_group(tp_group))
    return EmbeddingOutput(out, modality)


# ============================================================================ reference
def modality_reference(ids, text_vocab_size, audio_base, codebook_size, num_codebooks):
    ids = ids.long()
    mod = torch.where(ids < text_vocab_size, 0,
                      torch.where(ids < audio_base, 1, 2 + torch.div(ids - audio_base, codebook_size,
                                                                     rounding_mode="floor")))
    outside = (ids < 0) | (ids >= audio_base + num_codebooks * codebook_size)
    return torch.where(outside, -1, mod).to(torch.int8)


def interleaved_embedding_reference(
    ids: torch.Tensor,
    weight: torch.Tensor,
    *,
    text_vocab_size: int,
    audio_base: int,
    codebook_size: int,
    num_codebooks: int,
    vocab_start: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> EmbeddingOutput:
    """Plain PyTorch (Megatron's ``VocabParallelEmbedding`` steps) with autograd."""
    local = ids.long() - _resolve(weight, vocab_start, tp_group)
    inside = (local >= 0) & (local < weight.shape[0])
    rows = weight[torch.where(inside, local, torch.zeros_like(local))]
    out = torch.where(inside[..., None], rows, torch.zeros_like(rows))
    out = reduce_forward(out, tp_group)
    return EmbeddingOutput(out, modality_reference(ids, text_vocab_size, audio_base,
                                                   codebook_size, num_codebooks))
