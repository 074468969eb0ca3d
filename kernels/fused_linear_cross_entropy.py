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

* **Inactive rows** (S2ST sources, padding: loss mask 0) get loss 0, lse 0 and exact-zero
  gradients. On CPU both directions gather the ``N_a`` active rows of ``hidden``
  (``index_select``) and every matmul below runs on ``N_a`` rows; on a GPU, where counting
  them would make the host wait for the device once per micro-batch and direction, they
  stay in place with upstream gradient 0 and label -1 and ``N_a`` below is ``N``
  (:func:`~.flce_backward.compacts_rows`: no host synchronisation in either direction).
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

Tuning (:mod:`.flce_tuning`): on CUDA each kernel is autotuned over a small Hopper space
keyed on ``(H, V_local, dtypes, role)``; the backward kernels use grouped ("swizzled")
program order so programs running together share weight tiles in L2. The forward's V and H
loops are one flattened software-pipelined loop (``tl.range(flatten=True)``). The compacted
rows are padded to a multiple of 64 on CUDA and every ``dlogits`` slice to a multiple of 16
columns (:func:`padded_width`, zeros), so the matmuls' main loops are software-pipelined with
16-byte async copies on every slice, the ragged last one included.
:mod:`soda_kernels.compile_check` compiles every kernel x config for sm_90a with the
production arguments and reads the code (``benchmarks/results/sm90_codegen.md``).

Modules, one idea each: :mod:`.flce_kernels` (the ``@triton.jit`` kernels),
:mod:`.flce_tuning` (precision policy, autotune spaces, keys, pinned configs),
:mod:`.flce_ops` (one launch per piece of work, Triton and torch, and :data:`WORK`),
:mod:`.flce_backward` (the recompute backward's plan and slice pass), :mod:`.flce_train`
(the three-matmul training path), :mod:`.flce_measure` (the design and GEMM engine measured
on the device, cached on disk), :mod:`.gemm_engine` (the plain GEMMs on the Triton matmul or
cuBLAS) and this module (custom ops, autograd, public API and the
reference). Every name they define that tests or callers use is importable from here too.

:func:`fused_linear_cross_entropy_reference` materialises all logits in fp32 (or fp64) and
uses autograd: it is the ground truth for tests and benchmarks.

Both implementations are ``torch.library`` custom ops (``soda_kernels::flce_forward`` /
``flce_backward``) with fake (meta) functions, called from a ``torch.autograd.Function``, so
``torch.compile(fullgraph=True)`` traces through them without a graph break. The TP group
crosses the op boundary as its name (see :mod:`._vocab_parallel`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from soda_kernels._vocab_parallel import (
    combine_across_ranks,
    group_rank_size,
    reduce_backward,
    reduce_forward,
    register_group,
    resolve_group,
)

# Re-exported: the public names of the split-out modules stay importable from here.
from soda_kernels.flce_backward import (  # noqa: F401
    _backward,
    _n_valid,
    active_index,
    backward_extra_bytes,
    backward_slices,
    cost_model,
    default_grad_h_slices,
    default_vocab_slice,
    put_rows,
    row_multiple,
    row_policy,
    take_rows,
)
from soda_kernels.flce_measure import check_choices, default_engine, resolve_loss_plan
from soda_kernels.flce_ops import (  # noqa: F401
    WORK,
    WorkCounter,
    _mm_f32,
    grad_logits_torch,
    grad_logits_triton,
    lse_partials_torch,
    lse_partials_triton,
    matmul_torch,
    matmul_triton,
    padded_width,
)
from soda_kernels.flce_tuning import (  # noqa: F401
    _SMEM_BUDGET,
    CONFIGS,
    autotuner,
    dot_precision,
    pinned_configs,
    smem_estimate,
)

NUM_LOSS_GROUPS = 3  # text (incl. special), semantic, acoustic: soda_mega.tokens.LOSS_GROUPS


# ============================================================================ custom ops
@torch.library.custom_op("soda_kernels::flce_forward", mutates_args=())
def _flce_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  active: torch.Tensor, z_loss: float, vocab_start: int, num_real_vocab: int,
                  group: str, impl: str, vocab_slice: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_valid = _n_valid(weight, vocab_start, num_real_vocab)
    idx = active_index(active)  # None on a GPU: rows masked, no host sync (compacts_rows)
    h_a, labels_a = take_rows(hidden, idx, active, 0.0), take_rows(labels, idx, active, -1)
    if impl == "triton":
        m, s, t = lse_partials_triton(h_a, weight, labels_a, vocab_start, n_valid)
    else:
        m, s, t = lse_partials_torch(h_a, weight, labels_a, vocab_start, n_valid, vocab_slice)
    del h_a
    lse_a, target = combine_across_ranks(m, s, t, resolve_group(group))
    loss = put_rows(lse_a - target + z_loss * lse_a * lse_a, idx, active)
    return loss, put_rows(lse_a, idx, active)


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
                   vocab_slice: int, grad_h_slices: int, gemm_engine: str) -> torch.Tensor:
    return _backward(grad_loss, hidden, weight, labels, active, lse, grad_weight, accumulate,
                     z_loss, vocab_start, _n_valid(weight, vocab_start, num_real_vocab),
                     resolve_group(group), impl, vocab_slice, grad_h_slices, gemm_engine)


@_flce_backward.register_fake
def _(grad_loss, hidden, weight, labels, active, lse, grad_weight, accumulate, z_loss,
      vocab_start, num_real_vocab, group, impl, vocab_slice, grad_h_slices, gemm_engine):
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
                group, impl, vocab_slice, grad_h_slices, fuse_main_grad, gemm_engine="triton"):
        loss, lse = torch.ops.soda_kernels.flce_forward(
            hidden, weight, labels, active, z_loss, vocab_start, num_real_vocab, group, impl,
            vocab_slice)
        ctx.save_for_backward(hidden, weight, labels, active, lse)
        ctx.args = (z_loss, vocab_start, num_real_vocab, group, impl, vocab_slice, grad_h_slices,
                    gemm_engine)
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
        return (grad_h, target) + (None,) * 11


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
    loss_mask: torch.Tensor | None = None,
    loss_groups: torch.Tensor | None = None,
    *,
    z_loss: float = 0.0,
    num_real_vocab: int | None = None,
    vocab_start: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    impl: str = "triton",
    vocab_slice: int | None = None,
    fuse_main_grad: bool = True,
    num_groups: int = NUM_LOSS_GROUPS,
    known_grad: torch.Tensor | None = None,
    row_chunk: int | None = None,
    group_rows: int | None = None,
    grad_h_slices: int | None = None,
    loss_plan: str = "roofline",
    gemm_engine: str = "auto",
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
    gradients (three matmuls instead of four, ``row_chunk`` rows of logits at a time and one
    pair of gradient matmuls per ``group_rows`` rows) and the backward checks the incoming
    gradient against ``known_grad`` (a mismatch is still exact: it costs the recompute). On a
    GPU :func:`~soda_kernels.flce_plan.choose_train_plan` may keep the recompute path instead
    when its roofline model predicts it faster (logged at DEBUG on ``soda_kernels.flce``);
    giving ``row_chunk`` or ``group_rows`` forces the three matmuls with those sizes.
    ``grad_h_slices`` (default :func:`~soda_kernels.flce_backward.default_grad_h_slices`):
    vocabulary slices per pass over the recompute backward's fp32 ``grad_h`` accumulator.

    ``loss_plan`` (``roofline``, ``recompute``, ``three_matmul``, ``measure``, ``auto``) and
    ``gemm_engine`` (``auto``, ``triton``, ``torch``: the plain GEMMs on the Triton matmul or
    on cuBLAS through torch): how the training path's design and GEMM engine are chosen, by
    the model, by name, or by timing them on this device with a cache on disk
    (:mod:`soda_kernels.flce_measure`). Outside the training path only the engine applies
    (``auto``: triton).
    """
    _check_inputs(hidden, weight, labels, impl)
    check_choices(loss_plan, gemm_engine)
    engine = default_engine(gemm_engine, impl)
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
    for name, value in (("row_chunk", row_chunk), ("group_rows", group_rows),
                        ("grad_h_slices", grad_h_slices)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    n, h = hidden.shape
    slices = grad_h_slices or default_grad_h_slices(n, h, cols, n_valid, weight.dtype,
                                                    hidden.device, impl, main_grad=fuse)
    if known_grad is not None and _train_path(hidden, weight, fuse):
        from soda_kernels.flce_train import TrainLinearCrossEntropyFunction, choose_train_plan

        if known_grad.shape != labels.shape:
            raise ValueError(f"known_grad must be [N] = [{labels.shape[0]}], got "
                             f"{tuple(known_grad.shape)}")
        plan = choose_train_plan(n, h, max(n_valid, 1), weight.dtype, hidden.device, impl, fuse,
                                 cols, slices, row_chunk or 0, group_rows or 0)
        call = dict(hidden=hidden, weight=weight, labels=labels, loss_mask=loss_mask,
                    loss_groups=loss_groups, z_loss=z_loss, num_real_vocab=num_real_vocab,
                    vocab_start=vocab_start, tp_group=tp_group, impl=impl, vocab_slice=cols,
                    fuse_main_grad=fuse_main_grad, num_groups=num_groups, known_grad=known_grad,
                    row_chunk=row_chunk, group_rows=group_rows, grad_h_slices=slices)
        plan, engine = resolve_loss_plan(plan, loss_plan, gemm_engine, impl, call, fuse,
                                         bool(row_chunk or group_rows))
        if plan.path == "three_matmul":
            loss, lse = TrainLinearCrossEntropyFunction.apply(
                hidden.contiguous(), weight if fuse else weight.contiguous(),
                labels.contiguous(), active, known_grad.detach().float().contiguous(),
                float(z_loss), int(vocab_start), int(num_real_vocab), register_group(tp_group),
                impl, int(cols), int(plan.row_chunk), int(plan.group_rows), int(slices), fuse,
                engine)
            sums, counts = loss_group_stats(loss, loss_groups, active, num_groups)
            return LinearCrossEntropyOutput(loss, lse, sums, counts)
    loss, lse = FusedLinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight if fuse else weight.contiguous(), labels.contiguous(), active,
        float(z_loss), int(vocab_start), int(num_real_vocab), register_group(tp_group), impl,
        int(cols), int(slices), fuse, engine)
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
    loss_mask: torch.Tensor | None = None,
    loss_groups: torch.Tensor | None = None,
    *,
    z_loss: float = 0.0,
    num_real_vocab: int | None = None,
    vocab_start: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
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
