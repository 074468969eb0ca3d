"""Fused linear cross-entropy for training in three matmuls: gradients computed in the forward.

In training the loss is the last node of the graph and the gradient it will receive is known
when its forward runs: the schedule back-propagates per-token *sums*
(``calculate_per_token_loss``), so token n's loss gets ``known_grad_n = loss_mask_n`` (times a
known loss scale). With that gradient the forward can finish the whole computation while the
logits exist, and the output layer costs exactly the three matmuls of materialised logits,
``6 N_a H V`` FLOPs (the recompute path of :mod:`.fused_linear_cross_entropy` needs four)::

    for each group of R active rows, in chunks of C rows (h_c [C, H]; R a multiple of C):
      x      = h_c @ W^T                        matmul 1, into one fp32 [C, V_local] buffer
      lse_n  = log sum_v exp x_n,v              this rank's (max, sum-exp, target), combined
                                                over the TP group (one MAX + one SUM
                                                all-reduce of [2, C], as the recompute path)
      dl_c  <- g_n (softmax_n,v (1 + 2 z lse_n) - [v == y_n])
                                                dlogits: in place in x (fp32), or into the
                                                group's 16-bit [R, V_local] buffer
    then, once per group:
      grad_h_g  = dl_g @ W                      matmul 2 (fp32, this rank's partial sum)
      grad_W   += dl_g^T @ h_g                  matmul 3, added into Megatron's fp32
                                                ``main_grad`` (or an fp32 weight gradient)

Why rows and not vocabulary slices: the softmax gradient of one column needs the row's final
logsumexp over the whole (TP-global) vocabulary, so a pass over vocabulary slices cannot
produce ``grad_W`` until every slice's logits were seen; it has to recompute them (the fourth
matmul of the recompute path) or keep them (``N x V``). A chunk of rows has all its columns
at once: its ``lse`` is final when its logits are, and nothing is computed twice. The price
is DRAM traffic: ``W`` is read once per chunk and once per group, and ``grad_W`` (fp32
``V H``) read and written once per group, where the recompute path writes it once. Keeping a
group of chunks' 16-bit ``dlogits`` (``R > C`` within the same memory budget) divides the
``main_grad`` traffic by ``R / C``; :mod:`.flce_plan` picks ``C`` and ``R`` and, on a GPU,
whether this path or the recompute path is predicted faster (:mod:`.flce_roofline`; at
N = 8192, H = 2048, V = 144,644 bf16 on an H100 it keeps the recompute path).

After the loop the fp32 ``grad_h`` of the ``N_a`` active rows is all-reduced over TP (the
input gradient of a column-parallel linear) and kept for the backward, which only checks that
the incoming gradient is bitwise the one assumed and scatters ``grad_h`` into
``grad_hidden``. If the incoming gradient differs (a caller that averaged instead of summing,
a gradient that never came from the assumed loss) nothing is lost: gradients are linear in
the upstream gradient, so the backward runs the recompute path of
:mod:`.fused_linear_cross_entropy` on the *difference* ``g_in - known_grad`` and adds it (exact
up to rounding, at the recompute path's cost).

Masked rows are compacted away before any matmul on CPU and masked on a GPU (as in the
recompute path, :func:`~.flce_backward.compacts_rows`); the backward's check of the incoming
gradient is a host comparison, or once per step a device flag (:func:`checked_per_step`, what
training uses). On CUDA the rows are padded with zero rows to a multiple of 64
(``row_multiple``), and the chunk height is a multiple of 64, so every matmul's row dimension
is pipelined.

Memory (:func:`train_extra_bytes`): the fp32 chunk buffer (``4 C V_local`` bytes), for 16-bit
weights the group's ``dlogits`` (``e R V_local``), the compacted rows (``N_a H e``) and the kept
fp32 ``grad_h`` (``4 N_a H``). The buffers stay within 15% of the weight and its gradient
buffer (:data:`~.flce_plan.CHUNK_SHARE`): the whole loss then stays within 1.2x the
logits-free minimum (bench_kernels' ``loss_memory`` row measures it).

Used only where it is exact and cheap: ``grad_W`` must accumulate in fp32 without a
weight-sized temporary, i.e. fp32 weights or a Megatron DDP fp32 ``main_grad``
(``_train_path`` in :mod:`.fused_linear_cross_entropy`); everything else (eval, no-grad, an
unknown downstream gradient, bf16 without ``main_grad``) runs the recompute path.
Deterministic: fixed chunk order, fixed matmul shapes, no atomics.

Megatron DDP: the weight's gradient is complete when the forward returns, but DDP learns of
it in the backward, as with the recompute path: the backward sets ``grad_added_to_main_grad``
and hands autograd the weight's own storage as a placeholder gradient, so DDP's
post-accumulate hook marks the parameter ready (starting the overlapped bucket reduction in
the last micro-batch) and adds nothing. Every micro-batch's forward precedes the last
micro-batch's backward in all of Megatron's schedules, so no reduction can start before the
last forward has added its share.

``impl="triton"`` runs the three matmuls with :func:`~.flce_ops.matmul_triton`, or with
cuBLAS through torch for ``engine="torch"`` (:mod:`.gemm_engine`)
(fp32 accumulation, grouped tile order, autotuned on CUDA; the logits chunk and ``dlogits``
padded to 16 columns so stores and operand loads stay 16-byte wide) and the softmax gradient
with two memory-bound kernels over the chunk buffer: ``_chunk_stats_kernel`` (one read: per-row online
max / sum-exp / target over column splits) and, after the TP combine,
``_chunk_dlogits_kernel`` (one read, one write: ``dlogits`` in place in fp32, or straight
into the 16-bit buffer). ``impl="torch"`` uses ``torch.mm`` and element-wise ops (bf16 on CPU
in vocabulary slices, so fp32 upcasts stay slice-sized).
:func:`flce_train_reference` is the plain-autograd oracle of the same contract.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from soda_kernels._vocab_parallel import combine_across_ranks, resolve_group
from soda_kernels.flce_backward import (
    _backward,
    _n_valid,
    active_index,
    put_rows,
    row_multiple,
    take_rows,
)
from soda_kernels.flce_ops import (
    WORK,
    _mm_f32,
    chunk_dlogits_triton,
    chunk_stats_triton,
    matmul_torch,
    padded_width,
    subtract_target_,
)

# Re-exported: the plan's names stay importable from here.
from soda_kernels.flce_plan import (  # noqa: F401
    CHUNK_SHARE,
    choose_train_plan,
    chunk_row_bytes,
    default_row_chunk,
    train_cost_model,
    train_extra_bytes,
)
from soda_kernels.gemm_engine import gemm


# ============================================================================ forward
def _logits(h_c, w, x, impl: str, vocab_slice: int, engine: str = "triton") -> None:
    """``x [C, V] = h_c @ w^T`` in fp32 (matmul 1; ``impl="triton"``: on GEMM ``engine``)."""
    if impl == "triton":
        gemm(h_c, w.t(), x, False, engine=engine, name="logits", key_h=w.shape[1],
             key_v=w.shape[0])
        return
    WORK.add("logits", h_c.shape[0], w.shape[0], h_c.shape[1])
    if w.dtype == torch.float32:
        torch.mm(h_c, w.t(), out=x)
        return
    for v0 in range(0, w.shape[0], vocab_slice):  # NOTE: slice-sized fp32 upcasts on CPU
        x[:, v0:v0 + vocab_slice] = _mm_f32(h_c, w[v0:v0 + vocab_slice].t())


def _grad_hidden(dl, w, out, impl: str, vocab_slice: int, engine: str = "triton") -> None:
    """``out [C, H] (fp32) = dl @ w`` (matmul 2)."""
    if impl == "triton":
        gemm(dl, w, out, False, engine=engine, name="grad_hidden", key_h=w.shape[1],
             key_v=w.shape[0])
        return
    if w.dtype == torch.float32:
        matmul_torch(dl, w, out, False, name="grad_hidden")
        return
    WORK.add("grad_hidden", dl.shape[0], w.shape[1], dl.shape[1])
    out.zero_()
    for v0 in range(0, w.shape[0], vocab_slice):
        out.add_(_mm_f32(dl[:, v0:v0 + vocab_slice], w[v0:v0 + vocab_slice]))


def _grad_weight(dl, h_c, out, accumulate: bool, impl: str, vocab_slice: int,
                 engine: str = "triton") -> None:
    """``out [V, H] (fp32) (+)= dl^T @ h_c`` (matmul 3)."""
    if impl == "triton":
        gemm(dl.t(), h_c, out, accumulate, engine=engine, name="grad_weight",
             key_h=h_c.shape[1], key_v=out.shape[0])
        return
    if h_c.dtype == torch.float32:
        matmul_torch(dl.t(), h_c, out, accumulate, name="grad_weight")
        return
    WORK.add("grad_weight", dl.shape[1], h_c.shape[1], dl.shape[0])
    for v0 in range(0, out.shape[0], vocab_slice):
        part = _mm_f32(dl[:, v0:v0 + vocab_slice].t(), h_c)
        block = out[v0:v0 + vocab_slice]
        block.add_(part) if accumulate else block.copy_(part)


def _softmax_grad_(x, labels_c, g_c, vocab_start: int, z_loss: float, group):
    """In place: ``x`` (fp32 logits ``[C, V_local]``) becomes ``dloss/dlogits`` times ``g_c``.
    Returns the rows' ``lse`` (over the TP-global vocabulary) and target logits."""
    c, v = x.shape
    local = labels_c.long() - vocab_start
    inside = (local >= 0) & (local < v)
    if v:
        t = torch.where(inside, x.gather(1, local.clamp(0, v - 1)[:, None]).squeeze(1), 0.0)
        m = x.amax(1)
        s = x.sub_(m[:, None]).exp_().sum(1)  # x now holds exp(x - m)
    else:
        t = x.new_zeros(c)
        m, s = x.new_full((c,), float("-inf")), x.new_zeros(c)
    lse, target = combine_across_ranks(m, s, t, group)
    if v:
        # p = exp(x - lse) = exp(x - m) exp(m - lse); rows with g = 0 stay exactly 0.
        scale = torch.where(g_c != 0, torch.exp(m - lse) * g_c * (1.0 + 2.0 * z_loss * lse), 0.0)
        x.mul_(scale[:, None])
        subtract_target_(x, local, g_c)
    return lse, target


def _softmax_grad_triton(x, dl, labels_c, g_c, vocab_start: int, z_loss: float, group,
                         n_valid: int):
    """:func:`_softmax_grad_` with the two Triton kernels on the chunk's first ``n_valid``
    columns: ``dl`` (``x`` or a 16-bit buffer, both at least :func:`padded_width` wide) gets
    the scaled dlogits and zeros in its padding columns; ``x`` keeps the logits unless ``dl``
    is ``x``."""
    c = x.shape[0]
    if n_valid:
        m, s, t = chunk_stats_triton(x, labels_c, vocab_start, n_cols=n_valid)
    else:
        t = x.new_zeros(c)
        m, s = x.new_full((c,), float("-inf")), x.new_zeros(c)
    lse, target = combine_across_ranks(m, s, t, group)
    if n_valid:
        chunk_dlogits_triton(x, dl, labels_c, lse, g_c, vocab_start, z_loss, n_valid)
    return lse, target


def train_rows(h_a, w, labels_a, g_a, grad_h, grad_weight, accumulate: bool, z_loss: float,
               vocab_start: int, group, impl: str, row_chunk: int, group_rows: int,
               vocab_slice: int, need_hidden: bool = True, need_weight: bool = True,
               engine: str = "triton"):
    """The loop over the compacted rows ``h_a`` (``w`` = the ``n_valid`` real rows of the
    weight): per chunk of ``row_chunk`` rows the fp32 logits and the softmax gradient (into
    the group's ``dlogits``), per group of ``group_rows`` rows (a multiple of the chunk; the
    chunk itself for fp32) ``grad_h[group]`` and ``grad_weight (+)= dlogits^T h``. Returns the
    rows' ``(lse, target logit)``. Triton: the buffers' rows are padded to a multiple of 64
    elements (16-byte aligned rows) and the matmuls read ``dlogits`` :func:`padded_width` wide
    (zero columns), so their operand loads stay vectorised and asynchronous."""
    rows_total, n_valid = h_a.shape[0], w.shape[0]
    dev, tri = h_a.device, impl == "triton"
    step = min(row_chunk, rows_total)
    low = w.dtype != torch.float32
    span = min(max(group_rows, step) // step * step, rows_total) if low else step
    width = n_valid + (-n_valid % 64 if tri else 0)
    store = padded_width(n_valid, impl)
    buf = torch.empty(step, width, device=dev, dtype=torch.float32)
    dl_buf = torch.empty(span, width, device=dev, dtype=w.dtype) if low else None
    lse_a = torch.empty(rows_total, device=dev, dtype=torch.float32)
    tgt_a = torch.empty_like(lse_a)
    for g0 in range(0, rows_total, span):
        g1 = min(g0 + span, rows_total)
        for r0 in range(g0, g1, step):
            r1 = min(r0 + step, g1)
            x = buf[:r1 - r0]
            if n_valid:
                _logits(h_a[r0:r1], w, x[:, :store], impl, vocab_slice, engine)
            dl = dl_buf[r0 - g0:r1 - g0] if low else x
            if tri:
                lse_a[r0:r1], tgt_a[r0:r1] = _softmax_grad_triton(
                    x[:, :store], dl[:, :store], labels_a[r0:r1], g_a[r0:r1], vocab_start,
                    z_loss, group, n_valid)
            else:
                lse_a[r0:r1], tgt_a[r0:r1] = _softmax_grad_(
                    x, labels_a[r0:r1], g_a[r0:r1], vocab_start, z_loss, group)
                if low and n_valid:
                    dl.copy_(x)
        if n_valid == 0:
            grad_h[g0:g1].zero_()
            continue
        dlg = (dl_buf if low else buf)[:g1 - g0, :store]
        if need_hidden:
            _grad_hidden(dlg, w, grad_h[g0:g1], impl, vocab_slice, engine)
        if need_weight:
            _grad_weight(dlg, h_a[g0:g1], grad_weight[:n_valid], accumulate or g0 > 0, impl,
                         vocab_slice, engine)
    return lse_a, tgt_a


def train_forward(hidden, weight, labels, active, known_grad, grad_weight, accumulate: bool,
                  z_loss: float, vocab_start: int, n_valid: int, group, impl: str,
                  row_chunk: int, vocab_slice: int, need_hidden: bool = True,
                  need_weight: bool = True, group_rows: int = 0, engine: str = "triton"):
    """Loss, lse, the compacted indices and the fp32 ``grad_h`` of the active rows.

    ``grad_weight`` (fp32 ``[V_local, H]``) gets ``dloss/dW`` for the upstream gradient
    ``known_grad`` added (``accumulate``) or stored; ``grad_h`` is all-reduced over ``group``.
    """
    n, h = hidden.shape
    dev = hidden.device
    idx = active_index(active)  # None on a GPU: rows masked, no host sync (compacts_rows)
    n_a = n if idx is None else idx.numel()
    lse = torch.zeros(n, device=dev, dtype=torch.float32)
    loss = torch.zeros_like(lse)
    if need_weight and not accumulate:
        grad_weight.zero_() if n_a == 0 or n_valid == 0 else grad_weight[n_valid:].zero_()
    pad = -n_a % row_multiple(dev, impl)
    grad_h = torch.empty(n_a + pad, h, device=dev, dtype=torch.float32)
    if n_a:
        h_a = take_rows(hidden, idx, active, 0.0)
        labels_a = take_rows(labels, idx, active, -1)
        g_a = take_rows(known_grad, idx, active, 0.0).float()
        if pad:  # zero rows with zero upstream gradient: their dlogits rows are exact zeros
            h_a = torch.cat([h_a, h_a.new_zeros(pad, h)])
            labels_a = torch.cat([labels_a, labels_a.new_full((pad,), -1)])
            g_a = torch.cat([g_a, g_a.new_zeros(pad)])
        lse_a, tgt_a = train_rows(h_a, weight[:n_valid], labels_a, g_a, grad_h, grad_weight,
                                  accumulate, z_loss, vocab_start, group, impl, row_chunk,
                                  group_rows, vocab_slice, need_hidden, need_weight, engine)
        del h_a
        lse_a, tgt_a = lse_a[:n_a], tgt_a[:n_a]
        lse = put_rows(lse_a, idx, active)
        loss = put_rows(lse_a - tgt_a + z_loss * lse_a * lse_a, idx, active)
    grad_h = grad_h[:n_a]
    if group is not None and need_hidden:
        dist.all_reduce(grad_h, group=group)
    return loss, lse, idx, grad_h


# ============================================================================ the per-step check
class _StepCheck:
    """Whether any backward of a step received another gradient than announced (a device
    flag: nothing is read before the step ends)."""

    def __init__(self):
        self.flag: torch.Tensor | None = None
        self.calls = 0

    def add(self, g_in: torch.Tensor, g_known: torch.Tensor) -> None:
        bad = (g_in != g_known).any()
        self.flag = bad if self.flag is None else self.flag | bad
        self.calls += 1


#: NOTE: module-level, not thread-local: on a GPU autograd runs the backward on its own
#: device thread, which must find the check the training thread opened.
_CHECKS: list[_StepCheck] = []


@contextmanager
def checked_per_step() -> Iterator[_StepCheck]:
    """Within the block (one training step), the backward of the three-matmul path trusts
    ``known_grad`` and only records on the device whether the incoming gradient differed; at
    the end of the block the flag is read once and a difference raises ``RuntimeError``.

    Without it each backward compares the gradients on the host (``torch.equal``: one host
    synchronisation per micro-batch on a GPU) and, on a difference, adds the recompute
    path's gradients of it (exact). Within it a difference cannot be repaired (the
    micro-batch's inputs are gone when it is found) but is never silent: the step fails
    before the optimizer applies it. NOTE: the one host sync per step is that read; the
    training step already reads its loss sums at the same point.
    """
    check = _StepCheck()
    _CHECKS.append(check)
    try:
        yield check
    finally:
        _CHECKS.remove(check)
    if check.flag is not None and bool(check.flag):
        raise RuntimeError(
            "the fused loss's backward received another gradient than the known_grad its "
            "forward was given (soda_kernels.flce_train): the schedule must back-propagate "
            "sum(token_loss * loss_mask) times the announced scale; this step's gradients are "
            "wrong and were not applied")


# ============================================================================ autograd
class TrainLinearCrossEntropyFunction(torch.autograd.Function):
    """Forward computes the loss and both gradients for ``known_grad``; backward checks the
    incoming gradient and scatters the kept ``grad_h`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, active, known_grad, z_loss, vocab_start,
                num_real_vocab, group, impl, vocab_slice, row_chunk, group_rows, grad_h_slices,
                fuse_main_grad, gemm_engine="triton"):
        n_valid = _n_valid(weight, vocab_start, num_real_vocab)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if fuse_main_grad:
            target, accumulate = weight.main_grad, True
        else:
            target = torch.empty_like(weight) if need_w else None
            accumulate = False
        loss, lse, idx, grad_h = train_forward(
            hidden, weight, labels, active, known_grad, target, accumulate, z_loss, vocab_start,
            n_valid, resolve_group(group), impl, row_chunk, vocab_slice, need_h, need_w,
            group_rows, gemm_engine)
        ctx.save_for_backward(hidden, weight, labels, active, lse, known_grad, idx, grad_h,
                              None if fuse_main_grad else target)
        ctx.args = (z_loss, vocab_start, num_real_vocab, group, impl, vocab_slice, grad_h_slices,
                    gemm_engine)
        ctx.param = weight if fuse_main_grad else None
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, labels, active, lse, known, idx, grad_h_a, grad_w = ctx.saved_tensors
        param = ctx.param
        grad_loss = grad_loss.float().contiguous()
        known = known.float()
        g_in, g_known = take_rows(grad_loss, idx, active, 0.0), take_rows(known, idx, active, 0.0)
        if _CHECKS:  # verified once per step, on the device until then (see checked_per_step)
            _CHECKS[-1].add(g_in, g_known)
            exact = True
        else:
            exact = torch.equal(g_in, g_known)  # NOTE: a host sync per micro-batch on a GPU
        if exact:
            grad_h = put_rows(grad_h_a.to(hidden.dtype), idx, active)
        else:
            # Linear in the upstream gradient: add the recompute path's gradients for the
            # difference (inactive rows have no gradient whatever they receive).
            z_loss, vocab_start, num_real_vocab, group, impl, vocab_slice, slices, engine = ctx.args
            target = param.main_grad if param is not None else grad_w
            if target is None:  # the weight needs no gradient (so it is fp32): scratch
                target = torch.zeros_like(weight)
            grad_h = put_rows(grad_h_a, idx, active)
            grad_h += _backward((grad_loss - known).contiguous(), hidden, weight, labels, active,
                                lse, target, True, z_loss, vocab_start,
                                _n_valid(weight, vocab_start, num_real_vocab),
                                resolve_group(group), impl, vocab_slice, slices, engine).float()
        grad_h = grad_h.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        if param is not None:
            param.grad_added_to_main_grad = True
            grad_w = weight.detach()  # placeholder, as in FusedLinearCrossEntropyFunction
        return (grad_h, grad_w) + (None,) * 14


# ============================================================================ reference
def flce_train_reference(hidden, weight, labels, known_grad, loss_mask=None, loss_groups=None,
                         **kwargs):
    """Oracle of the contract: the plain-PyTorch reference's loss and its autograd gradients
    for upstream gradient ``known_grad``; returns ``(output, grad_hidden, grad_weight)``."""
    from soda_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy_reference

    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fused_linear_cross_entropy_reference(h, w, labels, loss_mask, loss_groups, **kwargs)
    (out.loss * known_grad.to(out.loss.dtype)).sum().backward()
    return out, h.grad, w.grad
