"""Memory and layout search for models soda-mega does not build (the published runs).

soda-mega's own runs are planned with :mod:`soda_mega.training.plan`, which follows
soda-mega's code tensor by tensor. The published runs ran other code (Megatron + Transformer
Engine), so their memory is estimated with Korthikanti et al.'s accounting (arXiv 2205.05198,
section 4), generalised to GQA and gated FFNs. Per token and layer, bf16::

    replicated (divided by tp under SP):  8h  (two norm inputs, attention and MLP inputs)
                                          + 2h with dropout (two 1-byte masks)
    split by tp:  2(H + 2G)d  (Q, K, V)  + 2Hd (projection input) + 2 fc1_out + 2 ffn
                  + 5 a s with unfused attention (scores, softmax, dropout; dropped by
                    selective recompute; flash keeps only its logsumexp)
    full recompute keeps the layer input only: 2h (/tp under SP)

The first stage holds ``L`` layers' worth of micro-batches (``x (1 + (pp-1)/(pp vp))``
interleaved, the same rule as :func:`soda_mega.training.plan.in_flight`), static memory is
18 bytes per local parameter (bf16 weight, fp32 gradient, fp32 master and two moments, the
last 12 divided by DP under the distributed optimizer), and the CUDA context and allocator slack
are left out (see :func:`allocated_gib`). ``tests/planning`` checks this
against the paper's own memory figures (table C of the published file).
"""

from __future__ import annotations

from dataclasses import replace

from soda_mega.planning.constants import Efficiencies
from soda_mega.planning.hardware import GpuSpec
from soda_mega.planning.shapes import Layout, ModelShape, Stack
from soda_mega.planning.steptime import StepTime, stage_parameters, step_time

GIB = 2**30


def activation_bytes_per_token_layer(m: ModelShape, lay: Layout, stack: Stack) -> float:
    """Bytes one layer keeps per token for its backward (see the module docstring)."""
    tp, spd = lay.tp, (lay.tp if lay.sp else 1)
    h, d = m.hidden, m.head_dim
    if lay.recompute == "full":
        return 2 * h / spd
    replicated = 8 * h + (2 * h if m.dropout else 0)
    split = 2 * (m.heads + 2 * m.kv_heads) * d + 2 * m.heads * d + 2 * m.fc1_out + 2 * m.ffn
    if stack.attention == "unfused" and lay.recompute != "selective":
        split += 5 * m.heads * m.seq
    return replicated / spd + split / tp


def activation_gib(m: ModelShape, lay: Layout, stack: Stack) -> float:
    """Activations held by the first pipeline stage (GiB)."""
    tokens = lay.micro_batch * m.seq / lay.cp
    per_layer = activation_bytes_per_token_layer(m, lay, stack) * tokens
    factor = 1 + (lay.pp - 1) / (lay.pp * lay.vp) if lay.vp > 1 else 1.0
    in_flight = min(lay.pp, lay.micro_batches) / lay.pp
    return per_layer * m.layers * factor * in_flight / GIB


def static_gib(m: ModelShape, lay: Layout) -> float:
    """Weights, fp32 gradients and optimizer state on the largest stage (GiB)."""
    params = stage_parameters(m, lay)
    shard = lay.dp * lay.cp if lay.distributed_optimizer else 1
    return params * (2 + 4 + 12 / shard) / GIB


def loss_gib(m: ModelShape, lay: Layout, stack: Stack) -> float:
    """The last stage's logits of one micro-batch (GiB): bf16 logits and the fp32 softmax
    Megatron's eager cross-entropy keeps, or the bf16 logits a fused cross-entropy turns into
    its gradient in place."""
    n = lay.micro_batch * m.seq / lay.cp
    per_logit = 2 + (4 if stack.loss == "megatron" else 0)
    return n * m.padded_vocab(lay.tp) / lay.tp * per_logit / GIB


def allocated_gib(m: ModelShape, lay: Layout, stack: Stack) -> float:
    """Predicted allocated peak: static + activations + loss.

    NOTE: the published runs are checked against this, without the CUDA context and
    allocator slack that :class:`~soda_mega.training.plan.MemoryAssumptions` adds for
    soda-mega's own runs: those are assumptions about soda-mega's stack, and with them the
    dgxc Llama 8B (8 GPUs) and Nemotron 15B (16, 32 GPUs) layouts, which ran, would not fit."""
    return static_gib(m, lay) + activation_gib(m, lay, stack) + loss_gib(m, lay, stack)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(m: ModelShape, base: Layout, max_pp: int = 64):
    """Every layout on ``base``'s GPUs, global batch and CP: TP inside a node, PP, VP (up to
    3), SP, micro-batch 1, 2, 4 and recompute."""
    gpus = base.gpus
    for tp in _divisors(min(base.gpus_per_node, gpus // base.cp)):
        for pp in _divisors(m.layers):
            if pp > max_pp or (gpus // base.cp) % (tp * pp):
                continue
            dp = gpus // (base.cp * tp * pp)
            for vp in ([1, 2, 3] if pp > 1 else [1]):
                for sp in ((False, True) if tp > 1 else (False,)):
                    for mbs in (1, 2, 4):
                        for rec in ("none", "selective", "full"):
                            lay = replace(base, tp=tp, pp=pp, dp=dp, vp=vp, sp=sp,
                                          micro_batch=mbs, recompute=rec)
                            if lay.check(m) is None:
                                yield lay


def best_layout(m: ModelShape, base: Layout, gpu: GpuSpec, stack: Stack,
                eff: Efficiencies | None = None) -> tuple[Layout, StepTime, int]:
    """The fastest predicted layout that fits ``gpu``'s memory (and how many fit)."""
    best, fits = None, 0
    for lay in layouts(m, base):
        if allocated_gib(m, lay, stack) > gpu.memory_gib:
            continue
        fits += 1
        st = step_time(m, lay, gpu, stack, eff)
        if best is None or st.seconds < best[1].seconds:
            best = (lay, st)
    if best is None:
        raise ValueError(f"no layout of {m.name} fits {gpu.memory_gib:g} GiB")
    return best[0], best[1], fits
