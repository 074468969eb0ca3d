"""What a run will do before it starts: layout, steps, schedule and per-GPU memory estimate.

Used by ``soda-mega train --dry-run`` and the launchers. Nothing is allocated.

Activation memory per transformer layer and micro-batch (bytes; s tokens, b sequences,
h width, q = heads*head_dim, k = kv_heads*head_dim, f = FFN width, e = bytes per element),
counting the tensors autograd keeps for the backward with a fused (flash / SDPA) attention::

    e*s*b*(4h          residual-stream inputs of both norms and both norm outputs
           + q + 2k    rotated queries, keys, values
           + q         attention output (input of the output projection)
           + 2f + f)   SwiGLU fc1 output (gate and up) and fc2 input

Tensor parallelism divides every term but the 4h ones, which sequence parallelism divides
too. Full recomputation keeps only each layer's input (e*s*b*h). The first pipeline stage of
1F1B holds ``pp`` micro-batches in flight. The loss layer adds the logits unless the fused
cross-entropy (kernels.loss=triton/torch) avoids them. This is an estimate for planning;
issue 6's memory planner checks it against measured peaks on the GPU.
"""

from __future__ import annotations

from soda_mega.config.loader import dump_config
from soda_mega.config.schema import SodaConfig
from soda_mega.model.accounting import memory_per_rank
from soda_mega.tokens.layout import VocabLayout

GIB = 2**30


def activation_bytes(cfg: SodaConfig) -> dict[str, float]:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    e = 2 if t.precision == "bf16" else 4
    s, b, tp = m.seq_length, t.micro_batch_size, p.tensor_parallel
    q = m.num_attention_heads * m.head_dim
    k = m.num_kv_heads * m.head_dim
    f = m.ffn_hidden_size
    stream = 4 * m.hidden_size / (tp if p.sequence_parallel else 1)
    split = (q + 2 * k + q + 3 * f) / tp
    per_layer = e * s * b * (stream + split)
    if t.recompute == "full":
        per_layer = e * s * b * m.hidden_size / (tp if p.sequence_parallel else 1)
    layers_per_stage = m.num_layers // p.pipeline_parallel
    in_flight = p.pipeline_parallel
    vocab = VocabLayout.from_config(cfg.vocab).padded_size(tp, m.make_vocab_size_divisible_by)
    if cfg.kernels.loss == "megatron":
        logits = s * b * vocab / tp * (e + 4 + 4)  # logits, fp32 copy and softmax kept for backward
    else:
        logits = 0.0
    return {"per_layer": per_layer, "layers": per_layer * layers_per_stage * in_flight,
            "logits": logits, "total": per_layer * layers_per_stage * in_flight + logits}


def describe_run(cfg: SodaConfig, world_size: int) -> str:
    """Human-readable plan of a run on ``world_size`` GPUs (raises on an impossible layout)."""
    from soda_mega.training.trainer import peak_learning_rate, total_steps

    p, t = cfg.parallel, cfg.training
    model_ranks = p.tensor_parallel * p.pipeline_parallel
    if world_size % model_ranks:
        raise ValueError(f"world size {world_size} is not a multiple of TP x PP = {model_ranks}")
    dp = world_size // model_ranks
    per_replica, rem = divmod(t.global_batch_size, dp * t.micro_batch_size)
    if rem:
        raise ValueError(f"training.global_batch_size={t.global_batch_size} is not a multiple of "
                         f"micro_batch_size {t.micro_batch_size} x DP {dp}")
    steps = total_steps(cfg)
    weights = memory_per_rank(cfg, dp=dp)
    act = activation_bytes(cfg)
    static = float(weights.get("total_bytes", 0))
    lines = [
        "# resolved configuration",
        dump_config(cfg).rstrip(),
        "",
        "# parallel layout",
        f"world {world_size} = TP {p.tensor_parallel} x PP {p.pipeline_parallel} x DP {dp}"
        + (f" (virtual pipeline {p.virtual_pipeline})" if p.virtual_pipeline else "")
        + (" + sequence parallel" if p.sequence_parallel else ""),
        f"global batch {t.global_batch_size} x {cfg.model.seq_length} tokens = "
        f"{per_replica} micro-batches of {t.micro_batch_size} per replica per step",
        f"steps {steps} for {t.train_tokens:.3g} tokens; peak lr {peak_learning_rate(cfg):.3g} "
        f"({t.lr_schedule}, warmup {t.warmup_fraction:.0%}, decay {t.decay_fraction:.0%} "
        f"{t.decay_shape})",
        "",
        "# memory per GPU (estimate, largest pipeline stage)",
        f"weights + grads + optimizer  {static / GIB:8.2f} GiB",
        f"activations ({cfg.training.recompute} recompute, {p.pipeline_parallel} in flight) "
        f"{act['layers'] / GIB:8.2f} GiB",
        f"logits ({cfg.kernels.loss} loss)  {act['logits'] / GIB:8.2f} GiB",
        f"total                        {(static + act['total']) / GIB:8.2f} GiB",
    ]
    return "\n".join(lines)
