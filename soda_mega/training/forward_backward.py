"""One global batch through Megatron-core's schedules: DDP wrapping, loss, gradient finalisation.

The loss is a per-token mean over the whole global batch: each micro-batch's loss function
returns the *sum* of its masked token losses and its token count, the schedule backpropagates
the sums, and ``finalize_model_grads`` divides the gradients by the token count all-reduced
over data-parallel ranks (``calculate_per_token_loss``). This makes DP=N exactly equal to one
process on the N-times larger batch, even when loss masks differ between micro-batches.

The model gets the loss mask too and returns :class:`~soda_mega.model.lm_head.LMLoss`; besides
``lm loss`` each micro-batch reports ``loss_text`` / ``loss_semantic`` / ``loss_acoustic`` as
``[sum, count]`` (the per-token loss includes the z-loss term ``training.z_loss * lse^2``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from soda_mega.config.schema import SodaConfig
from soda_mega.tokens.layout import LOSS_GROUPS


@dataclass
class StepResult:
    """Loss of one global batch as seen by this rank (zero counts off the last stage)."""

    loss_sum: float
    num_tokens: int
    #: loss group (text, semantic, acoustic) -> (loss sum, token count)
    groups: dict[str, tuple[float, int]] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.num_tokens, 1)


def wrap_ddp(chunks: Sequence[torch.nn.Module], cfg: SodaConfig) -> list[DistributedDataParallel]:
    """Wrap model chunks in Megatron DDP and hook its gradient sync into the schedules."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # NOTE: with several chunks (interleaved PP) only the first starts its buckets at
            # once; the others are synchronised by the schedule's grad_sync_func.
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    tcfg = wrapped[0].config
    no_sync = [m.no_sync for m in wrapped]
    tcfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if cfg.parallel.overlap_grad_reduce:
        sync = [m.start_grad_sync for m in wrapped]
        tcfg.grad_sync_func = sync[0] if len(sync) == 1 else sync
    tcfg.finalize_model_grads_func = finalize_model_grads
    return wrapped


def masked_token_loss(loss_mask: torch.Tensor, output_tensor):
    """Sum of per-token losses over unmasked positions, their count, and detached reports.

    ``output_tensor`` is the model's ``LMLoss`` (or a plain tuple of its fields, or a bare
    per-token loss tensor, which reports ``lm loss`` only).
    """
    groups = {}
    if isinstance(output_tensor, tuple):
        output_tensor, group_loss, group_tokens = output_tensor
        groups = {f"loss_{name}": torch.stack([group_loss[i].detach().float().clone(),
                                                group_tokens[i].detach().float()])
                  for i, name in enumerate(LOSS_GROUPS)}
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.reshape(-1).float()
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    # NOTE: the schedule divides/rescales the returned loss in place, so report a clone.
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report, **groups}


def lm_forward_step(data_iterator, model, *, loss_for: Callable[[dict], Callable] | None = None):
    """Megatron ``forward_step_func``: next micro-batch through the model, per-token losses.

    ``loss_for(batch)`` makes the micro-batch's loss function (Megatron's ``loss_func``, called
    on the last stage with the model's :class:`~soda_mega.model.lm_head.LMLoss`); the default
    is :func:`masked_token_loss` of the batch's loss mask. Bind it with ``functools.partial``:
    Megatron calls this with two positional arguments.
    """
    batch = next(data_iterator)
    if batch is not None and torch.cuda.is_available():
        # The loader yields (pinned) CPU tensors; the copy overlaps with the previous kernels.
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    if batch is None:
        # A middle pipeline stage: its input is the previous stage's activations, and the
        # loader did not read any tokens for it.
        return model(None, None, None), partial(masked_token_loss, None)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    if loss_for is not None:
        return output, loss_for(batch)
    return output, partial(masked_token_loss, batch["loss_mask"])


@contextmanager
def evaluation_mode(model: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Model chunks (DDP-wrapped or bare) in eval mode, without the z-loss term and without
    autograd, for held-out NLL: the plain cross-entropy, as reported by every evaluation.
    Training mode and z-loss are restored on exit."""
    modules = list(model)
    chunks = [getattr(m, "module", m) for m in modules]
    saved = [c.z_loss for c in chunks]
    for chunk in chunks:
        chunk.z_loss = 0.0
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for chunk, z in zip(chunks, saved):
            chunk.z_loss = z
        for m in modules:
            m.train()


@contextmanager
def known_loss_gradient(model: Sequence[torch.nn.Module]) -> Iterator[float]:
    """While a training schedule runs: tell the model chunks the downstream gradient of their
    per-token loss, ``loss_mask * scale``.

    :func:`masked_token_loss` returns ``sum(token_loss * loss_mask)``, Megatron's schedule with
    ``calculate_per_token_loss`` does not divide it and back-propagates it times
    ``config.grad_scale_func``'s loss scale (1 when unset), so each token's loss receives its
    mask times that scale. The fused loss uses this to compute its gradients in the forward
    (``soda_kernels.flce_train``); its backward checks the gradient really is this one, on
    the device, and the check is read once when the step's schedule is done
    (``checked_per_step``: one host sync per step instead of one per micro-batch).
    """
    from soda_kernels.flce_train import checked_per_step

    chunks = [getattr(m, "module", m) for m in model]
    config = chunks[0].config
    scale = 1.0
    if getattr(config, "grad_scale_func", None) is not None:
        device = next(chunks[0].parameters()).device
        scale = float(config.grad_scale_func(torch.ones(1, device=device)))
    saved = [getattr(c, "known_loss_grad_scale", None) for c in chunks]
    for chunk in chunks:
        chunk.known_loss_grad_scale = scale
    try:
        with checked_per_step():
            yield scale
    finally:
        for chunk, value in zip(chunks, saved):
            chunk.known_loss_grad_scale = value


def run_schedule(
    model: Sequence[torch.nn.Module],
    batches: Sequence[dict | None],
    forward_step_func: Callable,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list[dict]:
    """``batches`` through Megatron's schedule for this layout (no pipelining, 1F1B or
    interleaved); returns the loss functions' reports of this rank (empty off the last stage).
    """
    model = list(model)
    batches = list(batches)
    iterators = [iter(batches) for _ in model] if len(model) > 1 else iter(batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iterators,
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def forward_backward(
    model: Sequence[torch.nn.Module],
    micro_batches: Iterable[dict],
    num_micro_batches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> StepResult:
    """Run one global batch (``num_micro_batches`` micro-batches) and return its loss.

    Gradients are left in the DDP ``main_grad`` buffers, already reduced and scaled.
    ``micro_batches`` yields dicts with ``tokens``, ``labels``, ``loss_mask`` and
    ``position_ids`` of shape ``[micro_batch_size, seq_length]``.
    """
    model = list(model)
    if not forward_only:
        for chunk in model:
            chunk.zero_grad_buffer()
    batches = list(micro_batches)
    if len(batches) != num_micro_batches:
        raise ValueError(f"expected {num_micro_batches} micro-batches, got {len(batches)}")
    if forward_only:
        losses = run_schedule(model, batches, lm_forward_step, seq_length, micro_batch_size, True)
    else:
        with known_loss_gradient(model):
            losses = run_schedule(model, batches, lm_forward_step, seq_length, micro_batch_size)
    totals: dict[str, torch.Tensor] = {}
    for item in losses:
        for key, value in item.items():
            totals[key] = totals.get(key, torch.zeros(2, dtype=torch.float64)) + value.double()
    total = totals.get("lm loss", torch.zeros(2, dtype=torch.float64))
    groups = {name: (float(totals[f"loss_{name}"][0]), int(totals[f"loss_{name}"][1]))
              for name in LOSS_GROUPS if f"loss_{name}" in totals}
    return StepResult(loss_sum=float(total[0]), num_tokens=int(total[1]), groups=groups)
