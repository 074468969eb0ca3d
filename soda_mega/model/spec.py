"""The Qwen3-style transformer layer as a Megatron-core ``ModuleSpec`` tree.

Pre-norm block: RMSNorm -> self-attention (fused QKV column-parallel linear, per-head RMSNorm
on queries and keys, RoPE, fused core attention, row-parallel output projection) -> residual
-> RMSNorm -> SwiGLU MLP (fused gate+up column-parallel linear, row-parallel down projection)
-> residual. No biases anywhere. Each slot can take another module (e.g. a Triton kernel) by
editing the spec, not the layer code.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from soda_mega.model.attention import SodaCoreAttention
from soda_mega.model.norm import RMSNorm


def qwen3_layer_spec(qk_norm: bool = True, attention_backend: str = "auto") -> ModuleSpec:
    """Layer spec with RMSNorm, QK-norm, GQA self-attention and a SwiGLU MLP."""
    qk = RMSNorm if qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ModuleSpec(
                        module=SodaCoreAttention, params={"backend": attention_backend}
                    ),
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk,
                    k_layernorm=qk,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
