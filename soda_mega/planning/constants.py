"""The step-time model's global constants: one named field each, with its source.

These are the few numbers that are not datasheet figures or read off the code (the GPU's own
achieved fractions live in :mod:`soda_mega.planning.hardware`). They are global: the same
values predict every published row and every soda-mega layout; none is set per row.
:data:`SOURCES` says where each comes from; a GPU campaign result can replace the ones marked
"campaign" (:mod:`soda_mega.planning.calibrate`), and the planner then says which are measured.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Efficiencies:
    """Achieved fractions and per-element costs the step-time model charges."""

    #: a GEMM's efficiency falls with each dimension ``x`` as ``x / (x + gemm_half_dim)``
    gemm_half_dim: float = 128.0
    #: cuDNN / FA3 flash attention (Transformer Engine) vs the large-GEMM rate, forward
    te_attention_fwd: float = 0.75
    #: ... backward (five matmuls, 2.5x the forward FLOPs)
    te_attention_bwd: float = 0.6
    #: flash-attn 2 / torch SDPA (soda-mega's attention) vs the large-GEMM rate, forward
    fa2_attention_fwd: float = 0.5
    #: ... backward
    fa2_attention_bwd: float = 0.4
    #: backward over forward bytes of the elementwise and norm kernels
    elementwise_backward_ratio: float = 2.0
    #: bytes per attention-score element, forward (unfused: scale-mask-softmax 4, dropout 5)
    unfused_score_bytes_fwd: float = 9.0
    #: ... backward (dropout 5, softmax 6)
    unfused_score_bytes_bwd: float = 11.0
    #: bytes per logit of Megatron's eager vocab-parallel cross-entropy, forward + backward
    megatron_ce_bytes: float = 60.0
    #: bytes per logit of a fused cross-entropy kernel over materialised logits
    fused_ce_bytes: float = 10.0
    #: share of the TP collectives hidden under GEMMs by Transformer Engine's overlap
    tp_overlap_hidden: float = 0.7
    #: Megatron DDP bucket (parameters): the last bucket's reduction is never hidden
    dp_bucket_params: float = 40e6
    #: bytes moved per local parameter by the optimizer step (fused Adam + grad-norm pass)
    adam_bytes_per_param: float = 34.0
    #: fixed seconds per step outside the model (loss all-reduce, logging, timers)
    step_overhead_s: float = 0.01
    #: measured / predicted time of soda-mega's fused loss (1 = the roofline as it is)
    fused_loss_scale: float = 1.0
    #: measured / predicted time of soda-mega's embedding (1 = bytes at HBM rate)
    embedding_scale: float = 1.0


SOURCES = {
    "gemm_half_dim": "FITTED (the one constant fitted to the published table: the best of 64, 96, "
                     "128, 192, 256 for the worst-row error); GEMM efficiency falls off below a few "
                     "hundred along a dimension (tile quantisation, NVIDIA's 'Matrix multiplication "
                     "background' guide)",
    "te_attention_fwd": "published: FlashAttention-3 / cuDNN reach ~600 of 989 TFLOP/s forward at "
                        "head dim 128 on H100 (Shah et al. 2024), i.e. ~0.75 of a large GEMM",
    "te_attention_bwd": "published: FlashAttention-3 backward ~450-500 TFLOP/s on H100 (ibid.)",
    "fa2_attention_fwd": "published: FlashAttention-2 ~350 TFLOP/s forward on H100, ~70% of peak "
                         "on A100 (Dao 2023; Shah et al. 2024); campaign replaces it",
    "fa2_attention_bwd": "published: FlashAttention-2 backward (ibid.); campaign replaces it",
    "elementwise_backward_ratio": "read off the kernels: a backward reads the saved input and the "
                                  "output gradient and writes the input gradient",
    "unfused_score_bytes_fwd": "read off Megatron-LM 2022 core attention: FusedScaleMaskSoftmax "
                               "(read + write fp16) and dropout (read, write, 1-byte mask)",
    "unfused_score_bytes_bwd": "read off the same code: dropout backward 5, softmax backward 6",
    "megatron_ce_bytes": "read off megatron.core.tensor_parallel.cross_entropy: float upcast, max, "
                         "subtract, exp, sum, divide (forward), scale and downcast (backward)",
    "fused_ce_bytes": "read off a one-pass fused cross-entropy: logits read forward and backward, "
                      "gradient written (bf16)",
    "tp_overlap_hidden": "assumed: Transformer Engine userbuffer overlap hides most TP "
                         "communication (NeMo performance guide); not fitted per row",
    "dp_bucket_params": "Megatron-core DistributedDataParallelConfig default bucket (40M)",
    "adam_bytes_per_param": "read off fused Adam with fp32 master weights: read master, grad, "
                            "two moments, write master, two moments, bf16 weight; + grad norm",
    "step_overhead_s": "assumed: loss reduction, logging and timer synchronisation per step",
    "fused_loss_scale": "assumed 1: soda_kernels.flce_roofline's prediction of the two designs "
                        "as it is (its own 0.7 / 0.8 fractions); the campaign's kernel rows fit it",
    "embedding_scale": "assumed 1: the lookup and its gradient at the HBM rate; the campaign fits it",
}

#: the constants a GPU campaign of soda-mega's own kernels can measure
CAMPAIGN_FITTABLE = ("gemm_large", "fa2_attention_fwd", "fa2_attention_bwd", "fused_loss_scale",
                     "embedding_scale")


def constant_table(eff: Efficiencies) -> list[tuple[str, float, str]]:
    """(name, value, source) of every constant, for ``--explain``."""
    return [(f.name, getattr(eff, f.name), SOURCES[f.name]) for f in fields(eff)]
