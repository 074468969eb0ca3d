"""What a run will do before it starts: layout, steps, schedule, and the per-GPU memory plan.

Used by ``soda-mega train --dry-run`` (and so the launchers' ``--dry-run``, which also opens
and checks the datasets: :func:`describe_data`), by the start-up line of a run
(:func:`start_line`), by
``soda-mega bench memory`` and by the throughput benchmark to skip what cannot fit. Nothing
is allocated.

The memory plan predicts, for every pipeline stage, the peak of
``torch.cuda.max_memory_allocated`` in a training step, then adds what the caching allocator
does not count. Notation: ``n = seq_length * micro_batch_size`` tokens per micro-batch,
``h`` width, ``q = heads * head_dim / tp``, ``k = kv_heads * head_dim / tp``,
``f = ffn / tp``, ``e`` bytes per activation element (2 bf16, 4 fp32), ``u`` bytes of an fp32
copy of a bf16 tensor (4 in bf16, 0 in fp32, where ``.float()`` returns the same tensor), and
``/sp`` division by ``tp`` under sequence parallelism.

1. **Static**: weights (``2`` or ``4`` bytes per parameter), the fp32 ``main_grad`` buffer of
   Megatron DDP (``4``), fp32 master weights (bf16 only, ``4``) and Adam's two moments (``8``),
   the last two divided by DP with the distributed optimizer
   (:func:`soda_mega.model.accounting.memory_per_rank`, per stage).
2. **Activations one transformer layer keeps per token** (itemised by
   :func:`layer_activation_terms`; each term is a tensor autograd saves, read off the model's
   code and checked with ``saved_tensors_hooks`` on CPU, see tests/training/test_memory_plan.py)::

       norms        2 * ((4 + e) * h + 4) / sp   fp32 input (rms_norm saves it) + normalised
                                                 output before the weight + rstd, 2 norms
       linear_in    2 * e * h / sp               norm outputs, inputs of linear_qkv and fc1
       qkv_out      e * (q + 2k)                 linear_qkv output, kept alive by the value
                                                 (and, in fp32, key) views into it
       q_norm       4q + e*q + 4*heads/tp        fp32 query copy, normalised query, rstd
       k_norm       u*k + e*k + 4*kv_heads/tp    fp32 key copy (bf16 only: in fp32 the key
                                                 is a view of qkv_out), normalised key, rstd
       attention    e*q + e*k + e*q + 4*heads/tp rotated q and k, output, logsumexp (flash
                                                 and SDPA keep the same; the output projection
                                                 saves a view of the output, no copy)
       mlp          3 * e * f  (CUDA, fused SwiGLU: fc1 output 2f + fc2 input f)
                    5 * e * f  (CPU, unfused: + silu output + ``x_linear + glu_linear_offset``)

   Besides, each layer keeps RoPE's cos / sin tables for the query and the key,
   ``4 e s head_dim`` bytes per micro-batch (:func:`rope_table_bytes`).
   Not yet checked on a GPU: the fused-SwiGLU term, and what the CUDA attention backend keeps
   (an SDPA backend that expands the GQA heads, or falls back to the math path, keeps far
   more); with NVIDIA apex installed the norms run apex's fused kernel, which keeps less.

   ``recompute=selective`` (Megatron's core-attention checkpoint) drops only the logsumexp: the
   output projection keeps the attention output alive anyway, and flash/SDPA keep no
   ``s x s`` matrix to save. ``recompute=full`` keeps each layer's input ``e * h / sp`` and
   rebuilds one layer's activations during its backward.
3. **In flight**: no pipeline: one micro-batch. 1F1B: stage ``i`` of ``pp`` holds
   ``min(pp - i, m)`` micro-batches (``m`` per replica per step). Interleaved with ``v``
   chunks: ``min(2(pp - i - 1) + (v - 1) pp + 1, m v)`` chunk-micro-batches of ``L/(pp v)``
   layers each (stage 0: ``L (1 + (pp - 1)/(pp v))`` layer-activations vs 1F1B's ``L``).
   Pipeline stages also keep the received input and the sent output of each micro-batch in
   flight (``e * n * h / sp`` each; Megatron's ``deallocate_pipeline_outputs`` is off).
4. **Loss** (last stage), :func:`loss_terms`: ``kernels.loss=megatron`` keeps fp32 softmax
   (4 bytes per logit) and, with z-loss, the fp32 ``exp`` of the logsumexp (4), and peaks higher
   while the logits are upcast; the fused paths keep ``lse`` only, and their backward holds
   the compacted rows, an fp32 ``grad_h`` accumulator and one ``[n, S]`` vocabulary slice (the
   weight gradient goes straight into ``main_grad``).
5. **Working set** on top of the stored activations: the larger of the loss transients and one
   layer's backward (gradients of the residual stream, of the fc1 output and fc2 input, and
   the weight gradients Megatron DDP adds into ``main_grad`` and frees); on CPU also the
   gloo gradient sync's copy of the gradient buffer, with the embedding gradient alive.
6. **Optimizer step** (a separate, later peak): torch AdamW's foreach path allocates one fp32
   temporary the size of the local shard (CUDA); the per-tensor path one per parameter (CPU);
   cautious Adam about three per parameter.
7. **Outside the allocator** (assumptions, :class:`MemoryAssumptions`, not measurements): the
   CUDA context and library kernels, NCCL buffers when there is more than one GPU, and the
   caching allocator's slack (reserved minus allocated).

The allocated peak (items 1-6) is what the GPU test compares with
``torch.cuda.max_memory_allocated`` (target: within 10%, issue 6); the device total adds item 7.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from dataclasses import dataclass, field

from soda_mega.config.loader import dump_config
from soda_mega.config.schema import SodaConfig
from soda_mega.model.accounting import BYTES, per_rank_parameters
from soda_mega.run.resolved import ResolvedRun, padded_vocab, resolve_run
from soda_mega.tokens.layout import VocabLayout

GIB = 2**30
TARGETS = ("cuda", "cpu")


@dataclass(frozen=True)
class MemoryAssumptions:
    """Constants of the plan that are not read from the config (stated, not measured)."""

    #: which code paths run: "cuda" (fused SwiGLU, kernels auto -> triton) or "cpu"
    target: str = "cuda"
    #: CUDA context + kernel images of torch / cuBLAS / Triton, outside the caching allocator
    cuda_context_gib: float = 0.75
    #: NCCL communicator buffers when the world has more than one GPU
    comm_buffers_gib: float = 0.5
    #: caching-allocator slack (reserved - allocated) as a fraction of the allocated peak
    allocator_slack: float = 0.05

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")


def _e(cfg: SodaConfig) -> int:
    return BYTES[cfg.training.precision]


def resolved_loss(cfg: SodaConfig, target: str) -> str:
    """``kernels.loss`` as it will run on ``target`` (auto: triton on CUDA, megatron on CPU)."""
    loss = cfg.kernels.loss
    if loss == "auto":
        return "triton" if target == "cuda" else "megatron"
    return loss


# ----------------------------------------------------------------------------- activations
def layer_activation_terms(cfg: SodaConfig, target: str = "cuda") -> dict[str, float]:
    """Bytes per token one transformer layer keeps for its backward (no recompute), itemised.

    Formulas in the module docstring; ``total`` is their sum.
    """
    m, p = cfg.model, cfg.parallel
    e = _e(cfg)
    u = 4 if e != 4 else 0
    tp = p.tensor_parallel
    sp = tp if p.sequence_parallel else 1
    h = m.hidden_size
    q = m.num_attention_heads * m.head_dim / tp
    k = m.num_kv_heads * m.head_dim / tp
    f = m.ffn_hidden_size / tp
    heads, kv_heads = m.num_attention_heads / tp, m.num_kv_heads / tp
    terms = {
        "norms": 2 * ((4 + e) * h + 4) / sp,
        "linear_in": 2 * e * h / sp,
        "qkv_out": e * (q + 2 * k),
        "q_norm": (4 * q + e * q + 4 * heads) if m.qk_norm else 0.0,
        "k_norm": (u * k + e * k + 4 * kv_heads) if m.qk_norm else 0.0,
        "attention": e * q + e * k + e * q + 4 * heads,
        "mlp": (3 if target == "cuda" else 5) * e * f,
    }
    terms["total"] = sum(terms.values())
    return terms


def rope_table_bytes(cfg: SodaConfig) -> float:
    """RoPE's cos / sin tables ``[s, 1, 1, head_dim]`` that each layer builds for the query and
    for the key and keeps for backward: ``4 e s d`` bytes per layer and micro-batch."""
    return 4 * _e(cfg) * cfg.model.seq_length * cfg.model.head_dim


def layer_stored_bytes(cfg: SodaConfig, target: str = "cuda") -> float:
    """Bytes per token one layer keeps between its forward and backward, after recompute."""
    m, p = cfg.model, cfg.parallel
    sp = p.tensor_parallel if p.sequence_parallel else 1
    terms = layer_activation_terms(cfg, target)
    mode = cfg.training.recompute
    if mode == "full":
        return _e(cfg) * m.hidden_size / sp
    if mode == "selective":
        return terms["total"] - 4 * m.num_attention_heads / p.tensor_parallel
    return terms["total"]


def layer_backward_working_bytes(cfg: SodaConfig, tokens: int) -> float:
    """Gradient tensors alive while one layer runs its backward (bytes, one micro-batch).

    Residual-stream gradients (2 x ``e h / sp``), the fc1-output and fc2-input gradients
    (``e 3f``) per token, plus the largest weight gradient (fc1, ``e * h * 2f``) before
    Megatron DDP adds it into ``main_grad`` and frees it.
    """
    m, p = cfg.model, cfg.parallel
    e = _e(cfg)
    tp = p.tensor_parallel
    sp = tp if p.sequence_parallel else 1
    f = m.ffn_hidden_size / tp
    return tokens * e * (2 * m.hidden_size / sp + 3 * f) + e * m.hidden_size * 2 * f


def loss_terms(cfg: SodaConfig, tokens: int, target: str = "cuda",
               resolved: ResolvedRun | None = None) -> dict[str, float]:
    """Bytes of the output layer + loss for one micro-batch on the last stage (``resolved``: the
    run's vocabulary and padded vocabulary when the caller resolved them already).

    ``held``: kept from the loss forward to its backward, with the final norm's saved tensors
    and output; ``forward_extra`` / ``backward_extra``: transient peaks above ``held``. Per
    logit element (``V`` = local padded vocabulary), from the order of allocations in the code
    (checked against the CPU allocator's trace in tests/training/test_memory_plan.py):

    ``megatron``: the logits ``e``; with z-loss the logsumexp upcasts them (``u``), shifts
    (``4``) and keeps ``exp`` (``4``); the cross-entropy upcasts (``u``; in fp32 it works on
    the logits themselves) and turns that copy into the softmax in place (``4``, kept). So
    ``held = 4 + 4z`` and the forward peaks at ``e + u + 8z``. Backward: one new gradient of
    ``e`` bytes at a time (the bf16 cast of a branch gradient, or in fp32 the z-branch ``exp``
    gradient) while the kept tensors are freed one by one; the output layer's weight gradient
    (``e V h``) arrives after the logit gradients are gone.

    Fused (``torch`` / ``triton``, :mod:`soda_kernels.fused_linear_cross_entropy`), all
    tokens counted as active (masked ones are compacted away and only lower this): ``lse`` (4
    bytes per token) is kept. Training runs the three-matmul path
    (:mod:`soda_kernels.flce_train`: the schedule's downstream gradient is known, and DDP gives
    the weight an fp32 ``main_grad``): the forward also keeps the fp32 ``grad_h`` of the rows
    (``4 n h``), and holds the compacted rows (``e n h``) and one chunk buffer of ``C`` rows
    (fp32 logits, plus a 16-bit dlogits copy: ``C V (4 + e')``, ``C`` from
    ``default_row_chunk``; CPU bf16 adds fp32 upcasts of the chunk rows and of a weight slice);
    the backward only writes ``grad_hidden`` (``e n h``, and its cast from fp32 for bf16).
    The weight gradient goes straight into DDP's fp32 ``main_grad``: no weight-sized buffer.
    Under sequence parallelism the hidden states are first gathered to the full sequence
    (``e h`` per token, kept).
    """
    m, p = cfg.model, cfg.parallel
    e = _e(cfg)
    u = 4 if e != 4 else 0
    tp = p.tensor_parallel
    sp = tp if p.sequence_parallel else 1
    h = m.hidden_size
    if resolved is None:
        layout = VocabLayout.from_config(cfg.vocab)
        v_local = padded_vocab(layout, cfg) // tp
    else:
        layout, v_local = resolved.vocab, resolved.padded_vocab // tp
    z = cfg.training.z_loss > 0
    final_norm = tokens * (((4 + e) * h + 4) / sp + e * h / sp)  # norm saves + its output
    impl = resolved_loss(cfg, target)
    weight_grad = e * v_local * h
    if impl == "megatron":
        logits = tokens * v_local
        held = logits * (4 + (4 if z else 0))
        peak_fwd = logits * (e + u + (8 if z else 0))
        backward = max(e * logits, e * logits + weight_grad - held)
        return {"impl": impl, "held": final_norm + held,
                "forward_extra": max(0.0, peak_fwd - held), "backward_extra": backward}
    import torch

    from soda_kernels.flce_train import chunk_row_bytes, default_row_chunk
    from soda_kernels.fused_linear_cross_entropy import default_vocab_slice

    n = tokens * sp  # the fused op sees the full sequence under SP
    v_valid = max(1, min(v_local, layout.size))
    device = torch.device("cpu" if target == "cpu" else "cuda")
    dtype = {2: torch.bfloat16, 4: torch.float32}[int(e)]
    cols = default_vocab_slice(h, v_valid, device)
    rows = min(n, default_row_chunk(h, v_valid, dtype, device, impl, main_grad=True))
    gathered = n * e * h if p.sequence_parallel else 0.0
    held = final_norm + n * 4 + gathered + 4 * n * h
    upcast = (rows * h + cols * h + rows * cols) * 4 if (u and target == "cpu") else 0.0
    forward = e * n * h + rows * chunk_row_bytes(v_valid, dtype) + upcast
    return {"impl": impl, "held": held, "forward_extra": forward,
            "backward_extra": e * n * h * (2 if u else 1)}


def in_flight(cfg: SodaConfig, stage: int, micro_batches: int) -> tuple[int, int]:
    """(micro-batches or chunk-micro-batches in flight on ``stage``, layers each holds)."""
    p, layers = cfg.parallel, cfg.model.num_layers
    pp, vp = p.pipeline_parallel, p.virtual_pipeline
    if pp == 1:
        return 1, layers
    if vp:
        count = min(2 * (pp - stage - 1) + (vp - 1) * pp + 1, micro_batches * vp)
        return count, layers // (pp * vp)
    return min(pp - stage, micro_batches), layers // pp


# ----------------------------------------------------------------------------- static
def static_bytes(cfg: SodaConfig, params: int, dp: int) -> dict[str, float]:
    """Weights, gradient buffer and optimizer state of ``params`` local parameters (bytes).

    The same rules as :func:`soda_mega.model.accounting.memory_per_rank`.
    """
    bf16 = cfg.training.precision == "bf16"
    shard = dp if cfg.parallel.distributed_optimizer else 1
    master = math.ceil(params * 4 / shard) if bf16 else 0
    moments = math.ceil(2 * params * 4 / shard)
    return {"weights": params * BYTES[cfg.training.precision], "grads": params * 4,
            "optimizer_state": master + moments}


def optimizer_transient(cfg: SodaConfig, params: int, largest: int, dp: int, target: str) -> float:
    shard = dp if cfg.parallel.distributed_optimizer else 1
    local = math.ceil(params / shard)
    if cfg.training.cautious:
        return 3 * 4 * min(largest, local)
    return 4 * (local if target == "cuda" else min(largest, local))


# ----------------------------------------------------------------------------- plan
@dataclass
class StagePlan:
    """Predicted memory of one TP rank of one pipeline stage (bytes)."""

    stage: int
    parameters: int
    weights: float
    grads: float
    optimizer_state: float
    in_flight: int
    layers_per_chunk: int
    activations: float
    pipeline_buffers: float
    loss_held: float
    working_set: float
    working_set_source: str
    optimizer_transient: float
    forward_backward_peak: float
    optimizer_peak: float
    allocated_peak: float

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer_state


@dataclass
class MemoryPlan:
    """Per-GPU memory prediction for a run: every stage, the largest, and the device total."""

    world_size: int
    data_parallel: int
    micro_batches: int
    loss_impl: str
    stages: list[StagePlan]
    assumptions: MemoryAssumptions
    context: float = 0.0
    allocator_slack: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.allocated_peak)

    @property
    def allocated_peak(self) -> float:
        return self.worst.allocated_peak

    @property
    def device_total(self) -> float:
        return self.allocated_peak + self.allocator_slack + self.context

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(allocated_peak=self.allocated_peak, device_total=self.device_total,
                   worst_stage=self.worst.stage)
        return out


def plan_memory(cfg: SodaConfig, world_size: int = 1,
                assumptions: MemoryAssumptions | None = None,
                resolved: ResolvedRun | None = None) -> MemoryPlan:
    """Predict the per-GPU memory of ``cfg`` on ``world_size`` GPUs (see the module docstring).

    ``resolved``: the run's vocabulary, padded vocabulary and batch geometry when the command
    resolved them already (``train --dry-run``); else resolved here, so an impossible layout
    fails with the :class:`ConfigError` (a ``ValueError``) of :func:`resolve_run`."""
    a = assumptions or MemoryAssumptions()
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    resolved = resolved or resolve_run(cfg, world_size)
    if resolved.world_size != world_size:
        raise ValueError(f"the run was resolved for {resolved.world_size} ranks, not {world_size}")
    dp, micro = resolved.dp, resolved.grad_accum
    e = _e(cfg)
    sp = tp if p.sequence_parallel else 1
    tokens = m.seq_length * t.micro_batch_size
    ranks = per_rank_parameters(m, resolved.vocab, tp, pp)
    rope = rope_table_bytes(cfg)
    stored = layer_stored_bytes(cfg, a.target) * tokens + (0 if t.recompute == "full" else rope)
    full_layer = layer_activation_terms(cfg, a.target)["total"] * tokens + rope
    loss = loss_terms(cfg, tokens, a.target, resolved)
    layer_bwd = layer_backward_working_bytes(cfg, tokens)
    if t.recompute == "full":
        layer_bwd += full_layer  # the layer being recomputed holds its whole activation set
    vocab_shard = resolved.padded_vocab // tp * m.hidden_size
    largest = max(vocab_shard, m.hidden_size * 2 * m.ffn_hidden_size // tp)  # output layer or fc1
    stages = []
    for row in ranks:
        s = row["stage"]
        first, last = s == 0, s == pp - 1
        count, layers = in_flight(cfg, s, micro)
        static = static_bytes(cfg, row["total"], dp)
        activations = count * layers * stored + (count * tokens * 8 if first else 0)  # + token ids
        buffers = count * e * tokens * m.hidden_size / sp * ((not first) + (not last))
        working, source = layer_bwd, "layer backward"
        held = 0.0
        if last:
            held = loss["held"]
            loss_peak = max(loss["forward_extra"], loss["backward_extra"])
            if loss_peak > working:
                working, source = loss_peak, f"{loss['impl']} loss"
        fb = sum(static.values()) + activations + buffers + held + working
        if first and a.target == "cpu":
            # NOTE: on gloo the gradient reduce-scatter copies the whole gradient buffer
            # (CPU allocator trace), started from the embedding weight's post-accumulate hook
            # while that gradient (e V_shard h) is alive; activations are gone by then. It
            # sets the CPU peak once the fused loss writes its gradient into main_grad.
            sync = static["grads"] + e * vocab_shard
            if sum(static.values()) + sync > fb:
                fb, working, source = sum(static.values()) + sync, sync, "gradient sync (gloo)"
        opt = optimizer_transient(cfg, row["total"], largest, dp, a.target)
        opt_peak = sum(static.values()) + opt
        stages.append(StagePlan(
            stage=s, parameters=row["total"], weights=static["weights"], grads=static["grads"],
            optimizer_state=static["optimizer_state"], in_flight=count, layers_per_chunk=layers,
            activations=activations, pipeline_buffers=buffers, loss_held=held, working_set=working,
            working_set_source=source, optimizer_transient=opt, forward_backward_peak=fb,
            optimizer_peak=opt_peak, allocated_peak=max(fb, opt_peak)))
    plan = MemoryPlan(world_size=world_size, data_parallel=dp, micro_batches=micro,
                      loss_impl=loss["impl"], stages=stages, assumptions=a)
    if a.target == "cuda":
        plan.context = a.cuda_context_gib * GIB + (a.comm_buffers_gib * GIB if world_size > 1 else 0)
        plan.allocator_slack = a.allocator_slack * plan.allocated_peak
    if t.recompute == "selective":
        plan.notes.append("recompute=selective (core attention) saves only the logsumexp with "
                          "flash/SDPA attention; recompute=full is what cuts activation memory")
    return plan


def format_plan(plan: MemoryPlan, gpu_memory_gib: float | None = None) -> list[str]:
    """Lines of the itemised plan of the largest stage (used by ``train --dry-run``)."""
    w = plan.worst
    shard = "" if plan.data_parallel == 1 else f", sharded over DP {plan.data_parallel}"
    items = [
        ("weights", w.weights),
        ("gradient buffer (fp32 main_grad)", w.grads),
        (f"optimizer state (fp32 master + Adam{shard})", w.optimizer_state),
        (f"activations ({w.in_flight} in flight x {w.layers_per_chunk} layers)", w.activations),
    ]
    if w.pipeline_buffers:
        items.append(("pipeline send/recv buffers", w.pipeline_buffers))
    if w.loss_held:
        items.append((f"loss kept for backward ({plan.loss_impl})", w.loss_held))
    items += [
        (f"working set ({w.working_set_source})", w.working_set),
        ("optimizer-step peak (a separate moment)", w.optimizer_peak),
        ("allocated peak (torch.cuda.max_memory_allocated)", plan.allocated_peak),
    ]
    if plan.assumptions.target == "cuda":
        items += [("CUDA context + NCCL buffers (assumed)", plan.context),
                  (f"allocator slack (assumed {plan.assumptions.allocator_slack:.0%})",
                   plan.allocator_slack)]
    items.append(("total", plan.device_total))
    lines = [f"{label:<58}{value / GIB:9.2f} GiB" for label, value in items]
    if gpu_memory_gib:
        verdict = "fits" if plan.device_total <= gpu_memory_gib * GIB else "DOES NOT FIT"
        lines[-1] += f"   ({verdict} in {gpu_memory_gib:g} GiB)"
    lines += [f"note: {n}" for n in plan.notes]
    return lines


def parallel_layout(cfg: SodaConfig, resolved: ResolvedRun) -> str:
    """``world W = TP t x PP p x DP d`` (with the virtual pipeline and sequence parallelism)."""
    p = cfg.parallel
    return (f"world {resolved.world_size} = TP {resolved.tensor_parallel} x PP "
            f"{resolved.pipeline_parallel} x DP {resolved.dp}"
            + (f" (virtual pipeline {p.virtual_pipeline})" if p.virtual_pipeline else "")
            + (" + sequence parallel" if p.sequence_parallel else ""))


def batch_layout(resolved: ResolvedRun) -> str:
    """How the global batch splits: micro-batch x gradient accumulation x DP, and its tokens."""
    b = resolved.batch
    return (f"global batch {b.global_batch_size} = micro-batch {b.micro_batch_size} x "
            f"{b.micro_batches_per_step} gradient-accumulation steps x DP {b.dp_size}, of "
            f"{b.seq_length} tokens ({b.tokens_per_step:,} per step)")


def start_line(cfg: SodaConfig, resolved: ResolvedRun) -> str:
    """What rank 0 says as a run starts: layout, batch split, and where rank 0 runs (under
    torchrun, with the nodes and processes per node it was started with)."""
    world, per_node = resolved.world_size, os.environ.get("LOCAL_WORLD_SIZE")
    placed = ""
    if per_node and per_node.isdigit() and int(per_node) and world % int(per_node) == 0:
        nodes = world // int(per_node)
        placed = (f" ({nodes} node{'s' if nodes != 1 else ''} x {per_node} "
                  f"process{'es' if per_node != '1' else ''})")
    return (f"soda-mega: layout: {parallel_layout(cfg, resolved)}{placed}; "
            f"{batch_layout(resolved)}; rank 0 on {socket.gethostname()}")


def describe_data(cfg: SodaConfig, vocab: VocabLayout) -> list[str]:
    """The datasets of ``data.train`` (and ``data.valid``), opened and checked as the run will
    open them (index, metadata, vocabulary): a line each; a :class:`DatasetError` naming the
    path when one cannot be used. Remote datasets fetch their index into the node cache."""
    from soda_mega.data.read.split import open_split
    from soda_mega.data.shard_contract import MissingSplitError

    if not cfg.data.train:
        return ["none given: set --data.train=DIR[,DIR...] (folders built by `soda-mega data build`)"]
    splits, notes = [open_split(cfg, "train", vocab)], []
    if cfg.run.eval_interval:
        try:
            splits.append(open_split(cfg, "valid", vocab))
        except MissingSplitError as err:
            notes.append(f"validation is off: {err}")
    lines = []
    for split in splits:
        lines += [f"{source.where}: {len(source):,} documents, {source.num_tokens:,} tokens "
                  f"({split.split}, {source.kind})" for source in split.sources]
        split.close()
    return lines + notes


def describe_run(cfg: SodaConfig, world_size: int, resolved: ResolvedRun | None = None) -> str:
    """Human-readable plan of a run on ``world_size`` GPUs (raises on an impossible layout);
    ``resolved``: the run's resolved pieces when the command computed them already."""
    from soda_mega.training.trainer import peak_learning_rate, total_steps

    p, t = cfg.parallel, cfg.training
    resolved = resolved or resolve_run(cfg, world_size)
    if resolved.world_size != world_size:
        raise ValueError(f"the run was resolved for {resolved.world_size} ranks, not {world_size}")
    per_replica = resolved.grad_accum
    steps = total_steps(cfg)
    plan = plan_memory(cfg, world_size, resolved=resolved)
    lines = [
        "# resolved configuration",
        dump_config(cfg).rstrip(),
        "",
        "# parallel layout",
        parallel_layout(cfg, resolved),
        f"global batch {t.global_batch_size} x {cfg.model.seq_length} tokens = "
        f"{per_replica} micro-batches of {t.micro_batch_size} per replica per step",
        (f"steps {steps} for {t.epochs:g} epochs" if t.epochs is not None
         else f"steps {steps} for {t.train_tokens:.3g} tokens") + f"; peak lr {peak_learning_rate(cfg):.3g} "
        f"({t.lr_schedule}, warmup {t.warmup_fraction:.0%}, decay {t.decay_fraction:.0%} "
        f"{t.decay_shape})",
        "",
        f"# memory per GPU (prediction for CUDA, largest stage: {plan.worst.stage} of "
        f"{p.pipeline_parallel}, {t.recompute} recompute; `soda-mega bench memory` for all presets)",
        *format_plan(plan),
    ]
    return "\n".join(lines)
