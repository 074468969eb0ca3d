"""Predicted time of one training step, itemised, from shapes, layout, GPU and constants.

Per micro-batch, on one rank of each pipeline stage (``n = micro_batch x seq / cp`` tokens,
``e = 2`` bytes per bf16 element), every transformer layer costs:

* **GEMMs**: QKV, output projection, fc1, fc2; forward ``2 M K N`` FLOPs each, backward a
  data-gradient and a weight-gradient GEMM of the same size. A GEMM runs at
  ``peak x gemm_large x prod(x / (x + gemm_half_dim))`` over its three dimensions (small
  dimensions of a TP-split matrix lose tile efficiency).
* **attention**: flash (causal blocks skipped: ``4 n (s/2) H/tp d`` forward FLOPs, 2.5x that
  backward) at a fraction of the GEMM rate; or unfused 2022 attention (full ``s x s`` score
  GEMMs plus softmax / dropout traffic per score element).
* **elementwise and norms**: bytes of the two norms, two residual adds, the activation, RoPE
  and QK-norm (the sequence-parallel ones divided by ``tp``), at the achieved HBM rate; the
  backward moves ``elementwise_backward_ratio`` times as much.
* **TP collectives**: two all-reduces (or all-gather + reduce-scatter under sequence
  parallelism, the same bytes) of ``n h e`` forward and two backward, at the NCCL bus
  bandwidth of NVLink (or InfiniBand when TP spans nodes); Transformer Engine hides
  ``tp_overlap_hidden`` of them. Context parallelism exchanges K and V in a ring, hidden
  under the attention it overlaps.
* **recompute**: selective repeats the core attention forward; full the whole layer forward.

The first stage adds the embedding, the last the final norm, output layer and loss
(Megatron's eager cross-entropy, a fused cross-entropy, or soda-mega's fused linear +
cross-entropy through :func:`soda_kernels.flce_plan.plan_for_peak`: both designs, the
faster). A step is ``m x max(stage) + (pp - 1) / vp x mean(stage)`` (1F1B and interleaved
bubbles), plus pipeline sends where not overlapped, plus the DP gradient reduce-scatter and
parameter all-gather beyond what the last / first micro-batch hides (and the last bucket),
plus the optimizer step and a fixed overhead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from soda_mega.planning.constants import Efficiencies
from soda_mega.planning.hardware import GpuSpec
from soda_mega.planning.shapes import Layout, ModelShape, Stack

E = 2  # bytes per bf16 activation / weight element


@dataclass
class StepTime:
    """A predicted step: seconds per component (summed over the step's critical path)."""

    seconds: float
    parts: dict[str, float]
    tokens_per_step: int
    gpus: int
    model_flops_per_token: float
    peak_flops: float
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.seconds / self.gpus

    @property
    def mfu(self) -> float:
        """Model FLOPs (no recompute, full attention: soda-mega's convention) per second per
        GPU over the datasheet peak."""
        return self.tokens_per_s_per_gpu * self.model_flops_per_token / self.peak_flops

    def to_dict(self) -> dict:
        return {"step_s": self.seconds, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                "mfu": self.mfu, "parts_s": dict(self.parts), "notes": list(self.notes)}


def model_flops_per_token(m: ModelShape) -> float:
    """Training FLOPs per token, forward x 3, full (non-causal) attention, unpadded vocabulary:
    the convention of :func:`soda_mega.model.accounting.flops_per_token` for any FFN kind."""
    attention = 4 * m.seq * m.heads * m.head_dim
    return 3 * (m.layers * (2 * m.layer_params() + attention) + 2 * m.hidden * m.vocab)


# ----------------------------------------------------------------------------- kernels
class Rates:
    """Seconds of GEMMs, attention and memory traffic on one GPU under the constants."""

    def __init__(self, gpu: GpuSpec, eff: Efficiencies, stack: Stack):
        self.gpu, self.eff, self.stack = gpu, eff, stack
        self.gemm_rate = gpu.peak_flops * gpu.gemm_large
        self.hbm_rate = gpu.hbm_bytes_per_s * gpu.hbm_efficiency

    def gemm(self, m: float, k: float, n: float, count: float = 1) -> float:
        h = self.eff.gemm_half_dim
        shape = (m / (m + h)) * (k / (k + h)) * (n / (n + h))
        return count * 2 * m * k * n / (self.gemm_rate * shape)

    def attention(self, flops: float, backward: bool) -> float:
        te = self.stack.attention == "cudnn"
        frac = ((self.eff.te_attention_bwd if backward else self.eff.te_attention_fwd) if te else
                (self.eff.fa2_attention_bwd if backward else self.eff.fa2_attention_fwd))
        return flops / (self.gemm_rate * frac)

    def memory(self, nbytes: float) -> float:
        return nbytes / self.hbm_rate


def collective_bandwidth(gpu: GpuSpec, group: int, stride: int, gpus_per_node: int) -> float:
    """NCCL bus bandwidth (bytes/s) of a ring over ``group`` ranks ``stride`` apart: NVLink
    inside a node; across nodes the ``k`` members per node drive ``k`` NICs in parallel."""
    per_node = max(1, gpus_per_node // stride)
    nvlink = gpu.intra_node_bytes_per_s * gpu.link_efficiency
    if group <= per_node and group <= gpu.intra_node_group:
        return nvlink
    inter = min(per_node, group) * gpu.inter_node_bytes_per_s * gpu.link_efficiency
    return min(nvlink, inter) if gpu.intra_node_group > 1 else inter


# ----------------------------------------------------------------------------- one layer
def layer_parts(m: ModelShape, lay: Layout, r: Rates) -> dict[str, float]:
    """Seconds of one transformer layer for one micro-batch on one rank, by component:
    ``*_fwd`` and ``*_bwd`` (recompute and communication separate)."""
    tp, s = lay.tp, m.seq
    n = lay.micro_batch * s / lay.cp
    h, d = m.hidden, m.head_dim
    heads, kv = m.heads / tp, m.kv_heads / tp
    gemms = [(n, h, m.qkv_out / tp), (n, m.heads * d / tp, h), (n, h, m.fc1_out / tp),
             (n, m.ffn / tp, h)]
    out = {"gemm_fwd": sum(r.gemm(*g) for g in gemms),
           "gemm_bwd": sum(r.gemm(a, c, b) + r.gemm(b, a, c) for a, b, c in gemms)}
    if r.stack.attention != "unfused":
        flops = 4 * n * (s / 2) * heads * d
        out["attention_fwd"] = r.attention(flops, False)
        out["attention_bwd"] = r.attention(2.5 * flops, True)
    else:  # unfused: full s x s scores per head and sequence, no causal skipping
        batch = lay.micro_batch * heads
        scores = batch * s * s
        gf = r.gemm(s, d, s, batch) + r.gemm(s, s, d, batch)
        out["attention_fwd"] = gf + r.memory(scores * r.eff.unfused_score_bytes_fwd)
        out["attention_bwd"] = 2 * gf + r.memory(scores * r.eff.unfused_score_bytes_bwd)
    spd = tp if lay.sp else 1
    per_token = (2 * 2 * h + 2 * 3 * h + (h if m.dropout else 0)) / spd  # norms, residual adds
    act = {"swiglu": 3 * m.ffn, "gelu": 2 * m.ffn, "squared_relu": 2 * m.ffn}[m.ffn_kind] / tp
    per_token += act + (2 * (heads + kv) * d if m.rope else 0) + (2 * (heads + kv) * d if m.qk_norm else 0)
    out["elementwise_fwd"] = r.memory(n * per_token * E)
    out["elementwise_bwd"] = out["elementwise_fwd"] * r.eff.elementwise_backward_ratio
    comm = 0.0
    if tp > 1:
        bw = collective_bandwidth(r.gpu, tp, 1, lay.gpus_per_node)
        comm = 2 * 2 * (tp - 1) / tp * n * h * E / bw  # two all-reduces' worth
        if r.stack.tp_overlap:
            comm *= 1 - r.eff.tp_overlap_hidden
    out["tp_comm_fwd"] = out["tp_comm_bwd"] = comm
    if lay.cp > 1:  # ring exchange of K and V, overlapped with the attention it feeds
        bw = collective_bandwidth(r.gpu, lay.cp, tp, lay.gpus_per_node)
        ring = (lay.cp - 1) * 2 * n * kv * d * E / bw
        out["cp_comm_fwd"] = max(0.0, ring - out["attention_fwd"])
        out["cp_comm_bwd"] = max(0.0, 2 * ring - out["attention_bwd"])
    if lay.recompute == "selective":
        out["recompute"] = out["attention_fwd"]
    elif lay.recompute == "full":
        out["recompute"] = sum(v for k, v in out.items() if k.endswith("_fwd"))
    return out


# ----------------------------------------------------------------------------- output layer
@functools.lru_cache(maxsize=256)
def _soda_loss_seconds(n: int, h: int, v: int, gpu: GpuSpec) -> tuple[float, str]:
    import torch

    from soda_kernels.flce_plan import plan_for_peak
    from soda_kernels.flce_roofline import DevicePeak

    peak = DevicePeak(gpu.name, {2: gpu.peak_flops, 4: gpu.peak_flops / 2}, gpu.hbm_bytes_per_s)
    plan = plan_for_peak(n, h, v, torch.bfloat16, peak)
    return plan.predicted[plan.path]["seconds"], plan.path


def output_parts(m: ModelShape, lay: Layout, r: Rates) -> dict[str, float]:
    """Final norm, output layer and loss of one micro-batch on the last stage (seconds)."""
    n = lay.micro_batch * m.seq / lay.cp
    v = m.padded_vocab(lay.tp) / lay.tp
    h = m.hidden
    out = {}
    if r.stack.loss == "soda_fused":
        seconds, path = _soda_loss_seconds(int(n), h, int(min(v, m.vocab)), r.gpu)
        out["loss_fused"] = seconds * r.eff.fused_loss_scale
    else:
        out["output_gemm"] = r.gemm(n, h, v) + r.gemm(n, v, h) + r.gemm(h, n, v)
        per_logit = r.eff.megatron_ce_bytes if r.stack.loss == "megatron" else r.eff.fused_ce_bytes
        out["cross_entropy"] = r.memory(n * v * per_logit)
    if lay.sp:  # the final norm's output is gathered to the full sequence (and back)
        bw = collective_bandwidth(r.gpu, lay.tp, 1, lay.gpus_per_node)
        out["output_tp_comm"] = 2 * (lay.tp - 1) / lay.tp * n * h * E / bw
    return out


def embedding_seconds(m: ModelShape, lay: Layout, r: Rates) -> float:
    """Lookup (read row, write output) and the gradient's scatter-add into fp32 ``main_grad``."""
    n = lay.micro_batch * m.seq / lay.cp
    return r.memory(n * m.hidden * (2 * E + E + 8)) * r.eff.embedding_scale


# ----------------------------------------------------------------------------- the step
def stage_parameters(m: ModelShape, lay: Layout) -> float:
    """Parameters on one rank of the largest stage (first or last: + embedding / output)."""
    layers = m.layers / lay.pp * m.layer_params() / lay.tp
    shard = m.padded_vocab(lay.tp) / lay.tp * m.hidden
    return layers + (2 * shard if lay.pp == 1 else shard)


def step_time(m: ModelShape, lay: Layout, gpu: GpuSpec, stack: Stack,
              eff: Efficiencies | None = None) -> StepTime:
    """Predict one optimizer step of ``m`` under ``lay`` on ``gpu`` GPUs (see module doc)."""
    eff = eff or Efficiencies()
    bad = lay.check(m)
    if bad:
        raise ValueError(f"impossible layout {lay.label()}: {bad}")
    if lay.cp > 1 and stack.attention == "unfused":
        raise ValueError("context parallelism is modelled with flash attention only")
    r = Rates(gpu.with_gpus_per_node(lay.gpus_per_node), eff, stack)
    layer = layer_parts(m, lay, r)
    per_layer = sum(layer.values())
    chunk_layers = m.layers / lay.pp
    out = output_parts(m, lay, r)
    embed = embedding_seconds(m, lay, r)
    first = chunk_layers * per_layer + embed
    last = chunk_layers * per_layer + sum(out.values())
    stages = [first, last] if lay.pp > 1 else [first + sum(out.values())]
    mean = (first + last + max(0, lay.pp - 2) * chunk_layers * per_layer) / lay.pp \
        if lay.pp > 1 else stages[0]
    micro = lay.micro_batches
    parts: dict[str, float] = {}
    # steady state: every micro-batch through the slowest stage, itemised
    scale = micro * chunk_layers
    for k, v in layer.items():
        parts[f"layer {k}"] = scale * v
    parts["embedding"] = micro * embed if lay.pp == 1 else 0.0
    for k, v in out.items():
        parts[k] = micro * v
    parts["stage imbalance"] = micro * max(stages) - sum(parts.values())
    parts["pipeline bubble"] = (lay.pp - 1) / lay.vp * mean
    if lay.pp > 1:
        n = lay.micro_batch * m.seq / lay.cp
        neighbours_apart = lay.tp * lay.cp * lay.dp
        bw = collective_bandwidth(r.gpu, 2, neighbours_apart, lay.gpus_per_node)
        split = lay.tp if (lay.sp or stack.p2p_scatter_gather) else 1
        send = n * m.hidden * E / split / bw
        p2p = 2 * micro * lay.vp * send  # activation forward, its gradient backward
        parts["pipeline p2p"] = 0.0 if stack.overlap_p2p else p2p
    # data parallel: gradients reduced, parameters gathered (distributed optimizer)
    params = stage_parameters(m, lay)
    group = lay.dp * lay.cp
    notes = []
    if group > 1:
        bw = collective_bandwidth(r.gpu, group, lay.tp, lay.gpus_per_node)
        frac = (group - 1) / group
        grads = params * stack.grad_reduce_bytes
        if lay.distributed_optimizer:
            reduce, gather = frac * grads / bw, frac * params * E / bw
        else:
            reduce, gather = 2 * frac * grads / bw, 0.0
        tail = min(reduce, eff.dp_bucket_params * stack.grad_reduce_bytes * frac / bw)
        bwd_last = chunk_layers / lay.vp * (layer["gemm_bwd"] + layer["attention_bwd"])
        fwd_first = chunk_layers / lay.vp * (layer["gemm_fwd"] + layer["attention_fwd"])
        parts["dp grad reduce"] = (max(tail, reduce - bwd_last) if stack.overlap_grad_reduce
                                   else reduce)
        parts["dp param gather"] = (max(0.0, gather - fwd_first) if stack.overlap_param_gather
                                    else gather)
    shard = group if lay.distributed_optimizer else 1
    parts["optimizer"] = r.memory(params / shard * eff.adam_bytes_per_param)
    parts["step overhead"] = eff.step_overhead_s
    if lay.recompute == "full":
        notes.append("full recompute: each layer's forward runs twice")
    total = sum(parts.values())
    return StepTime(total, parts, lay.global_batch * m.seq, lay.gpus, model_flops_per_token(m),
                    gpu.peak_flops, notes)


def format_parts(st: StepTime) -> list[str]:
    """Lines of the breakdown: component, seconds, share of the step."""
    lines = []
    for k, v in st.parts.items():
        if abs(v) >= 5e-5:
            lines.append(f"  {k:<28}{v * 1e3:10.1f} ms  {v / st.seconds:6.1%}")
    lines.append(f"  {'step':<28}{st.seconds * 1e3:10.1f} ms")
    return lines
