"""Name and layout mapping between soda-mega's full weights and HuggingFace Qwen3 checkpoints.

The SODA architecture is Qwen3's (the public SODA checkpoints are Qwen3-format), so a model
is fully described by a ``Qwen3Config`` plus the vocabulary layout. Two tensors change layout:

* Megatron's fused QKV holds, for each KV group ``g``, the group's query heads, then its key
  head, then its value head (``[ng, (np/ng + 2) * hd, h]``); HF keeps ``q_proj``, ``k_proj``
  and ``v_proj`` separate.
* Megatron's SwiGLU ``linear_fc1`` stacks ``[gate; up]``; HF has ``gate_proj`` and ``up_proj``.

Padded vocabulary rows are kept (HF ``vocab_size`` = padded size); their logits are masked
by soda-mega and, being zero rows, contribute nothing to HF's embedding.
"""

from __future__ import annotations

import torch

from soda_mega.config.schema import SodaConfig


def hf_config_dict(cfg: SodaConfig, vocab_size: int) -> dict:
    """Keyword arguments of ``transformers.Qwen3Config`` for this model."""
    m = cfg.model
    return dict(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=m.seq_length,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        attention_bias=False,
        tie_word_embeddings=False,
        hidden_act="silu",
        bos_token_id=cfg.vocab.bos_id,
        eos_token_id=cfg.vocab.eos_id,
    )


def split_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """Megatron grouped QKV ``[(heads + 2 kv) * hd, h]`` -> (q, k, v) in HF row order."""
    per_group = heads // kv_heads
    grouped = qkv.view(kv_heads, (per_group + 2) * head_dim, -1)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    h = qkv.shape[-1]
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int,
              head_dim: int) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    h = q.shape[-1]
    per_group = heads // kv_heads
    grouped = torch.cat([
        q.view(kv_heads, per_group * head_dim, h),
        k.view(kv_heads, head_dim, h),
        v.view(kv_heads, head_dim, h),
    ], dim=1)
    return grouped.reshape(-1, h)


def to_hf(full: dict[str, torch.Tensor], cfg: SodaConfig) -> dict[str, torch.Tensor]:
    """soda-mega full weights (global names) -> HF ``Qwen3ForCausalLM`` state dict."""
    m = cfg.model
    out = {
        "model.embed_tokens.weight": full["embedding.word_embeddings.weight"],
        "model.norm.weight": full["decoder.final_layernorm.weight"],
        "lm_head.weight": full["output_layer.weight"],
    }
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(full[src + "self_attention.linear_qkv.weight"],
                            m.num_attention_heads, m.num_kv_heads, m.head_dim)
        gate, up = full[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({
            dst + "input_layernorm.weight": full[src + "input_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": full[src + "self_attention.linear_proj.weight"],
            dst + "post_attention_layernorm.weight": full[src + "pre_mlp_layernorm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": full[src + "mlp.linear_fc2.weight"],
        })
        if m.qk_norm:
            out[dst + "self_attn.q_norm.weight"] = full[src + "self_attention.q_layernorm.weight"]
            out[dst + "self_attn.k_norm.weight"] = full[src + "self_attention.k_layernorm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(hf: dict[str, torch.Tensor], cfg: SodaConfig) -> dict[str, torch.Tensor]:
    """HF ``Qwen3ForCausalLM`` state dict -> soda-mega full weights (global names)."""
    m = cfg.model
    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
        "output_layer.weight": hf["lm_head.weight"],
    }
    for i in range(m.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        out.update({
            dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"],
            dst + "self_attention.linear_qkv.weight": merge_qkv(
                hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
                hf[src + "self_attn.v_proj.weight"], m.num_attention_heads, m.num_kv_heads,
                m.head_dim),
            dst + "self_attention.linear_proj.weight": hf[src + "self_attn.o_proj.weight"],
            dst + "pre_mlp_layernorm.weight": hf[src + "post_attention_layernorm.weight"],
            dst + "mlp.linear_fc1.weight": torch.cat(
                [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0),
            dst + "mlp.linear_fc2.weight": hf[src + "mlp.down_proj.weight"],
        })
        if m.qk_norm:
            out[dst + "self_attention.q_layernorm.weight"] = hf[src + "self_attn.q_norm.weight"]
            out[dst + "self_attention.k_layernorm.weight"] = hf[src + "self_attn.k_norm.weight"]
    return out
