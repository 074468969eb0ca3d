"""The project's one table of numerical tolerances for tests, with the reason for each.

Parallel layouts run the same fp32 maths in a different order: tensor parallelism splits
matmuls and sums partial products with all-reduce, data parallelism sums gradients of two
half-batches. Those reorderings change fp32 results at the level of float32 rounding
(~6e-8 relative per operation) accumulated through a few layers; 1e-6 was observed for the
tiny model, so 1e-5 leaves margin while a real bug (a missing all-reduce, a wrong shard) shows
up as O(1e-2..1).
"""

# Parallel layout vs. one process, fp32 on CPU.
PARALLEL_FP32 = {
    "loss_rtol": 1e-5,  # relative difference of the mean token loss
    "grad_rel": 1e-5,   # max |g - g_ref| / max |g_ref| per parameter shard
}

# A broken parallel implementation must miss by far more than this (negative controls).
BROKEN_MIN_ERROR = 1e-2

# Model vs. an independent implementation (HF transformers Qwen3) with the same fp32 weights:
# different kernels (SDPA vs eager softmax, fused QKV vs separate projections) -> rounding only.
REFERENCE_MODEL_FP32 = {"logits_atol": 1e-4, "logits_rtol": 1e-4}

# bf16 on GPU vs. the fp32 run of the same weights: bf16 has 8 mantissa bits (~4e-3 relative);
# through a few layers the mean loss moves by well under 1%.
BF16_LOSS_RTOL = 1e-2

# Fused kernels (tests/kernels) against an fp64 oracle on the same inputs, cut-cross-entropy's
# rule: the kernel's error may exceed the error of the plain PyTorch path in the same dtype by
# at most this much. Loss: max abs error per token (losses are ~5-8 nats); gradients: max abs
# error / max |oracle|. fp32: both paths accumulate H-long dot products and a V-long sum-exp in
# fp32 in different orders; observed differences between them are <1e-6, so 1e-5 holds any
# reordering while a wrong term (a missing z-loss factor, a dropped column tile) costs >1e-3.
# bf16: the kernel accumulates in fp32 and keeps fp32 logits, while the torch path rounds logits
# to bf16 (8 bits, ~4e-3 relative), so the kernel is normally *more* accurate (observed: loss
# 1e-6 vs 2e-2); the gradient slack is one bf16 rounding (2^-8) of the largest gradient, for the
# bf16 dlogits chunk that feeds the matmuls and the bf16 gradients themselves.
KERNEL_ORACLE = {
    "fp32": {"loss": 1e-5, "grad_hidden": 1e-5, "grad_weight": 1e-5},
    "bf16": {"loss": 1e-3, "grad_hidden": 2.0 ** -8, "grad_weight": 2.0 ** -8},
}

# A kernel result compared with itself after an exact re-arrangement (more vocabulary splits,
# smaller row chunks, another TP layout): fp32 summation order only.
KERNEL_REORDER_FP32 = {"atol": 2e-5, "rtol": 1e-5}

# Deterministic embedding backward in bf16: the fp32 sum of a run of equal ids is rounded to
# bf16 once, so it is within one bf16 rounding (2^-8 relative) of the exact sum.
EMBEDDING_BF16_REL = 2.0 ** -8

# Multi-step training traces (loss and gradient norm per step) of one run vs another.
TRAINING_TRACE = {
    # Another layout: the per-step rounding differences above pass through Adam, whose
    # normalisation m / sqrt(v) turns a relative error in a tiny gradient component into the
    # same relative error in its update, so the traces drift apart slowly (1e-6 seen in 6 steps).
    "rtol": 1e-4,
    # The same layout resumed from a checkpoint: the same operations in the same order; only
    # the state round trip through the checkpoint could differ, and it must not.
    "resume_rtol": 1e-6,
}
# The committed golden trace of the tiny run vs. a fresh run: same code, but possibly another
# CPU whose BLAS picks other kernels (AVX2 vs AVX-512 summation order): rounding-level drift.
TRAINING_TRACE["golden_rtol"] = 1e-4

# The plain-PyTorch inference decoder (soda_mega/inference/decoder.py) vs. the Megatron model
# with the same fp32 weights, and KV-cache / left-padded batches vs. one full forward: the
# same maths with other matmul shapes, so fp32 rounding only (observed ~1e-6 on logits of ~10).
DECODER_FP32 = {"logits_atol": 1e-4, "logits_rtol": 1e-4}

# Held-out NLL per token of the Megatron model in fp32 (soda-mega eval nll) vs. the fp64
# plain-PyTorch decoder on the same windows: fp32 rounding of logits of ~10 through a few
# layers, averaged over hundreds of tokens (observed <3e-8 relative). The test's z-loss weight
# left on moves it by ~10%; a masked or misbucketed token changes the exact token counts.
REFERENCE_NLL_FP32 = 1e-6
# exported HF Qwen3 folder vs the Megatron model, same fp32 weights, other kernels: rounding only
# (observed ~1e-6 on logits of ~2)
HF_EXPORT_FP32 = {"logits_atol": 2e-5, "logits_rtol": 1e-5}

# The inference decoder in bf16 on a GPU vs. its fp32 run: bf16 weights and activations (8
# mantissa bits) through a few layers move log-probabilities by a few 1e-2 nats at most.
DECODER_BF16_LOGPROB_ATOL = 0.1
