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
