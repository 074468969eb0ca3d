"""RMSNorm that fits Megatron-core's norm spec slots (input, pre-MLP, final, q/k norms).

Computes in fp32 and multiplies the weight in the activation dtype, like Qwen3's reference
implementation, so exported checkpoints give the same numbers in HuggingFace. Under sequence
parallelism the weight is marked ``sequence_parallel`` so that Megatron-core's
``finalize_model_grads`` sums its gradient over the tensor-parallel group (each TP rank only
saw its slice of the sequence). Uses NVIDIA apex's fused kernel when installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from soda_mega.utils.optional import apex_fused_rms_norm


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))
        self._fused = apex_fused_rms_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None and x.is_cuda:
            return self._fused(x, self.weight, (self.hidden_size,), self.eps)
        normed = F.rms_norm(x.float(), (self.hidden_size,), eps=self.eps).to(x.dtype)
        return normed * self.weight

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
