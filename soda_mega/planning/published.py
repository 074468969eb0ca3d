"""The published Megatron-core runs the step-time model is checked against, as data.

Copied from ``../shared/PUBLISHED_THROUGHPUT.md`` (each table names its source): step times
of NVIDIA's dgxc-benchmarking (A), the Megatron-LM README's weak-scaling table (B, given in
TFLOP/s: converted to step time with Megatron's own FLOP formula, :func:`megatron_flops`) and
Korthikanti et al. 2022 (C). What the sources leave unstated is assumed here, once per
source, never per row (see :data:`ASSUMPTIONS`); Transformer Engine's kernels are assumed for
A and B, 2022 Megatron's unfused attention for C.
"""

from __future__ import annotations

from dataclasses import dataclass

from soda_mega.planning.hardware import GPUS, GpuSpec
from soda_mega.planning.shapes import TE_STACK, Layout, ModelShape, Stack

#: The Megatron-LM of 2022 (table C): unfused attention with dropout, eager cross-entropy,
#: no TP or pipeline overlap, fp16 with fp32 gradients.
MEGATRON_2022 = Stack("Megatron-LM 2022 (unfused attention, no TP/PP overlap)",
                      attention="unfused", loss="megatron", tp_overlap=False,
                      overlap_p2p=False, p2p_scatter_gather=True)
#: NeMo 25.04 on Megatron-core + TE (table A): NeMo's GPTConfig fuses the cross-entropy.
NEMO_2504 = Stack("Megatron-core + Transformer Engine via NeMo 25.04 (fused cross-entropy)",
                  loss="fused_ce", tp_overlap=True)

ASSUMPTIONS = {
    "A": "recompute none, distributed optimizer (stated); sequence parallel on for TP 2 (NeMo "
         "recipes); Transformer Engine cuDNN attention, NeMo's fused cross-entropy, TP / DP "
         "overlap on",
    "B": "micro-batch 4 (GBS / DP = 4 sequences per replica: one micro-batch, so the DP "
         "reduction overlaps the whole backward; the 32B row's fp32 reduce-scatter over one NIC "
         "per GPU could not hide otherwise), recompute none, sequence parallel for TP > 1, "
         "dropout 0.1 and learned positions (Megatron's GPT defaults), eager cross-entropy; "
         "Transformer Engine attention and the stated DP / TP / PP overlap; step time = "
         "Megatron's FLOPs / (TFLOP/s x GPUs)",
    "C": "A100 SXM 80 GB with 8 x HDR 200 Gb/s per node (Selene); dropout on, learned positions, "
         "unfused attention and eager cross-entropy of 2022 Megatron; 'full' without and "
         "'SP+sel' with sequence parallelism",
}


@dataclass(frozen=True)
class PublishedRun:
    """One measured step time with everything needed to predict it."""

    source: str
    label: str
    model: ModelShape
    layout: Layout
    gpu: GpuSpec
    stack: Stack
    step_s: float


def megatron_flops(m: ModelShape, batch: int) -> float:
    """FLOPs per step by Megatron-core r0.8's ``num_floating_point_operations`` (MHA, no
    recompute, full attention, padded vocabulary; ``12 B s L h^2 (...)``)."""
    h, s, L = m.hidden, m.seq, m.layers
    gated = 1.5 if m.ffn_kind == "swiglu" else 1.0
    return 12 * batch * s * L * h * h * (
        1 + m.ffn / h * gated + m.kv_heads / m.heads + s / h + m.padded_vocab(1) / (2 * L * h))


def _a_rows() -> list[PublishedRun]:
    h100 = GPUS["h100-sxm"]
    llama = ModelShape("Llama 3.1 8B", 4096, 32, 32, 8, 128, 14336, "swiglu", 128256, 8192)
    rows = []
    for gpus, t in zip((8, 16, 32, 64, 128), (12.27, 12.3, 12.32, 12.33, 12.33)):
        lay = Layout(1, 1, gpus // 2, 1, 16 * gpus, cp=2)
        rows.append(PublishedRun("A", f"Llama 3.1 8B, {gpus} GPUs", llama, lay, h100, NEMO_2504, t))
    nemo = ModelShape("Nemotron-4 15B", 6144, 32, 48, 8, 128, 24576, "squared_relu", 256000, 4096)
    times = (2.66, 2.66, 2.67, 2.67, 2.68, 2.71, 2.74, 2.78)
    for gpus, t in zip((16, 32, 64, 128, 256, 512, 1024, 2048), times):
        lay = Layout(2, 1, gpus // 2, 2, 4 * gpus, sp=True)
        rows.append(PublishedRun("A", f"Nemotron-4 15B, {gpus} GPUs", nemo, lay, h100, NEMO_2504, t))
    return rows


def _b_rows() -> list[PublishedRun]:
    h100 = GPUS["h100-sxm"]
    rows = []
    table = (("1.7B", 16, 2048, 24, 1, 1, 48, 192, 408.8), ("7.1B", 32, 4096, 30, 2, 1, 48, 192, 465.9),
             ("16B", 48, 6144, 32, 4, 1, 48, 192, 489.1), ("32B", 56, 7168, 48, 8, 1, 48, 192, 459.6),
             ("70B", 64, 8192, 84, 8, 2, 48, 384, 419.7))
    for name, heads, h, layers, tp, pp, dp, gbs, tflops in table:
        m = ModelShape(f"GPT {name}", h, layers, heads, heads, h // heads, 4 * h, "gelu", 131072,
                       4096, rope=False, dropout=True)
        lay = Layout(tp, pp, dp, 4, gbs, sp=tp > 1)
        step = megatron_flops(m, gbs) / (tflops * 1e12 * lay.gpus)
        rows.append(PublishedRun("B", f"GPT {name}, {lay.gpus} GPUs", m, lay, h100, TE_STACK, step))
    return rows


def _c_rows() -> list[PublishedRun]:
    a100 = GPUS["a100"]
    rows = []
    table = (("22B", 6144, 64, 48, 8, 8, 1, 4, 4, 1, 1.42, 1.10),
             ("175B", 12288, 96, 96, 64, 8, 8, 64, 1, 3, 18.13, 13.75),
             ("530B", 20480, 128, 105, 280, 8, 35, 280, 1, 3, 49.05, 37.83),
             ("1T", 25600, 160, 128, 512, 8, 64, 512, 1, 1, 94.42, 71.49))
    for name, h, heads, layers, gpus, tp, pp, gbs, mbs, vp, full, sel in table:
        m = ModelShape(f"GPT {name}", h, layers, heads, heads, h // heads, 4 * h, "gelu", 51200,
                       2048, rope=False, dropout=True)
        dp = gpus // (tp * pp)
        for label, t, sp, rec in (("full recompute", full, False, "full"),
                                  ("SP + selective", sel, True, "selective")):
            lay = Layout(tp, pp, dp, mbs, gbs, vp=vp, sp=sp, recompute=rec)
            rows.append(PublishedRun("C", f"GPT {name}, {label}", m, lay, a100, MEGATRON_2022, t))
    return rows


def published_runs() -> list[PublishedRun]:
    """Every row of the published table, in its order (A, B, C)."""
    return _a_rows() + _b_rows() + _c_rows()
