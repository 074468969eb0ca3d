"""Core attention for Megatron-core's ``SelfAttention``: flash-attn when installed, else SDPA.

Megatron's local ``DotProductAttention`` materialises the full ``[b, heads, s, s]`` score
matrix (the unfused math path). This module fills the same spec slot
(``SelfAttentionSubmodules.core_attention``) and hands the work to a fused kernel:

* ``flash``: ``flash_attn.flash_attn_func`` (bf16/fp16 CUDA tensors, native GQA);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient /
  cuDNN backends on GPU; the maths path on CPU), with ``enable_gqa`` for grouped KV heads;
* ``auto``: flash when importable and the inputs qualify, else SDPA.

Shapes follow Megatron: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` (np query
heads and ng KV groups of this TP rank), output ``[sq, b, np * hn]``. ``attention_mask`` is
Megatron's boolean mask where True means *masked out*; without one the attention is causal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from soda_mega.utils.optional import flash_attn_func

BACKENDS = ("auto", "flash", "sdpa")


def resolve_backend(requested: str) -> str:
    """Map the configured backend to the one that will run, failing early for ``flash``."""
    if requested not in BACKENDS:
        raise ValueError(f"kernels.attention: {requested!r} is not one of {BACKENDS}")
    if requested == "flash" and flash_attn_func() is None:
        raise RuntimeError(
            "kernels.attention=flash but flash-attn is not installed "
            "(pip install 'soda-mega[flash]', or use kernels.attention=auto)"
        )
    if requested == "auto":
        return "flash" if flash_attn_func() is not None else "sdpa"
    return requested


class SodaCoreAttention(MegatronModule):
    """Drop-in for Megatron's ``DotProductAttention`` backed by a fused attention kernel."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        backend: str = "auto",
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SodaCoreAttention does not implement context parallelism")
        self.backend = resolve_backend(backend)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def _use_flash(self, query: torch.Tensor, attention_mask) -> bool:
        return (
            self.backend == "flash"
            and query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
            and attention_mask is None
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("attention bias and packed sequences are not supported")
        sq, b, np_, hn = query.shape
        dropout = self.dropout_p if self.training else 0.0
        if self._use_flash(query, attention_mask):
            # flash-attn takes [b, s, heads, hn] and handles ng < np (GQA) natively.
            out = flash_attn_func()(
                query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                dropout_p=dropout, softmax_scale=self.softmax_scale, causal=True,
            )
            return out.transpose(0, 1).reshape(sq, b, np_ * hn)

        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if attention_mask is None:
            mask, causal = None, True
        else:
            mask, causal = ~attention_mask.bool(), False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=k.shape[1] != np_,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
