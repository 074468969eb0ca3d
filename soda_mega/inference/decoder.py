"""A plain-PyTorch SODA decoder with a KV cache, for scoring and generation on one device.

Training runs Megatron-core's GPTModel, whose attention has no KV cache in our CPU-capable
configuration; inference instead rebuilds the same Qwen3 block from the checkpoint's full
weights (:mod:`soda_mega.checkpoint.weights`, any TP/PP layout) in about a hundred lines:
RMSNorm, GQA attention with QK-norm and RoPE (rotate-half, as Megatron and HF), SwiGLU.
Its logits equal the Megatron model's (tests/inference/test_decoder.py).

Batches are left-padded: row ``b`` of a prompt batch starts at ``pad[b]``; padded key
positions are masked and every row's RoPE positions start at 0 at its first real token.
The output layer is cut to the vocabulary layout's real ids, so padded ids never appear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from soda_mega.config.schema import SodaConfig
from soda_mega.model.qwen3_mapping import to_hf
from soda_mega.tokens.layout import VocabLayout


@dataclass
class KVCache:
    """Keys and values of every layer for ``batch`` rows, up to ``capacity`` positions."""

    keys: list[torch.Tensor]  # per layer [B, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    pad: torch.Tensor  # [B] left padding of each row
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * weight.float()).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class SodaDecoder(torch.nn.Module):
    """Qwen3-style decoder over the full weights of a soda-mega model (inference only)."""

    def __init__(self, cfg: SodaConfig, full: dict[str, torch.Tensor],
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = VocabLayout.from_config(cfg.vocab)
        m = cfg.model
        self.num_layers, self.heads, self.kv_heads = m.num_layers, m.num_attention_heads, m.num_kv_heads
        self.head_dim, self.eps, self.qk_norm = m.head_dim, m.norm_eps, m.qk_norm
        hf = to_hf(full, cfg)
        real = self.layout.size

        def param(name: str, rows: int | None = None) -> torch.nn.Parameter:
            t = hf[name] if rows is None else hf[name][:rows]
            return torch.nn.Parameter(t.to(device=device, dtype=dtype).contiguous(), requires_grad=False)

        self.embed = param("model.embed_tokens.weight", real)
        self.final_norm = param("model.norm.weight")
        self.lm_head = param("lm_head.weight", real)
        self.layers = torch.nn.ModuleList()
        for i in range(m.num_layers):
            p = f"model.layers.{i}."
            layer = torch.nn.Module()
            layer.ln1 = param(p + "input_layernorm.weight")
            layer.ln2 = param(p + "post_attention_layernorm.weight")
            layer.wq = param(p + "self_attn.q_proj.weight")
            layer.wk = param(p + "self_attn.k_proj.weight")
            layer.wv = param(p + "self_attn.v_proj.weight")
            layer.wo = param(p + "self_attn.o_proj.weight")
            if m.qk_norm:
                layer.q_norm = param(p + "self_attn.q_norm.weight")
                layer.k_norm = param(p + "self_attn.k_norm.weight")
            layer.w_gate = param(p + "mlp.gate_proj.weight")
            layer.w_up = param(p + "mlp.up_proj.weight")
            layer.w_down = param(p + "mlp.down_proj.weight")
            self.layers.append(layer)
        inv = 1.0 / (m.rope_theta ** (torch.arange(0, m.head_dim, 2, dtype=torch.float64) / m.head_dim))
        self.register_buffer("inv_freq", inv.float().to(device), persistent=False)

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> SodaDecoder:
        from soda_mega.checkpoint.weights import load_full_weights

        cfg, full = load_full_weights(path)
        return cls(cfg, full, device, dtype).eval()

    @property
    def device(self) -> torch.device:
        return self.embed.device

    # ------------------------------------------------------------------ cache
    def new_cache(self, pad: torch.Tensor, capacity: int) -> KVCache:
        b = pad.shape[0]
        shape = (b, self.kv_heads, capacity, self.head_dim)
        make = lambda: torch.zeros(shape, device=self.device, dtype=self.embed.dtype)  # noqa: E731
        return KVCache([make() for _ in self.layers], [make() for _ in self.layers],
                       pad.to(self.device))

    # ------------------------------------------------------------------ forward
    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x [B, H, T, D], positions [B, T]
        angles = positions.float()[:, None, :, None] * self.inv_freq  # [B, 1, T, D/2]
        angles = torch.cat([angles, angles], dim=-1)
        return (x.float() * angles.cos() + _rotate_half(x.float()) * angles.sin()).to(x.dtype)

    def _attention(self, layer, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                   cache: KVCache | None, layer_idx: int, start: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = (x @ layer.wq.T).view(b, t, self.heads, self.head_dim)
        k = (x @ layer.wk.T).view(b, t, self.kv_heads, self.head_dim)
        v = (x @ layer.wv.T).view(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q = _rms_norm(q, layer.q_norm, self.eps)
            k = _rms_norm(k, layer.k_norm, self.eps)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        q, k = self._rope(q, positions), self._rope(k, positions)
        if cache is not None:
            cache.keys[layer_idx][:, :, start:start + t] = k
            cache.values[layer_idx][:, :, start:start + t] = v
            k = cache.keys[layer_idx][:, :, :start + t]
            v = cache.values[layer_idx][:, :, :start + t]
        # GQA without copying the cache: SDPA maps query head h to KV head h // group.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim),
                                             enable_gqa=self.heads != self.kv_heads)
        return out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim) @ layer.wo.T

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits ``[B, T, V]`` (or ``[B, V]`` with ``last_only``) of next-token prediction.

        ``tokens`` are left-padded by ``pad`` (``[B]``; default none). With ``cache`` the
        tokens continue the cached sequence (prefill when the cache is empty).
        """
        b, t = tokens.shape
        tokens = tokens.to(self.device)
        if cache is not None:
            pad = cache.pad
            start = cache.length
            if start + t > cache.capacity:
                raise ValueError(f"KV cache holds {cache.capacity} positions; {start + t} needed")
        else:
            pad = torch.zeros(b, dtype=torch.long, device=self.device) if pad is None else pad.to(self.device)
            start = 0
        total = start + t
        key_idx = torch.arange(total, device=self.device)
        query_idx = torch.arange(start, total, device=self.device)
        positions = (query_idx[None, :] - pad[:, None]).clamp(min=0)
        # True = may attend: causal, and never to a row's left padding.
        mask = (key_idx[None, :] <= query_idx[:, None])[None] & (key_idx[None, None, :] >= pad[:, None, None])
        # A padded query row would see no key at all (NaN); let it see itself.
        mask = mask | (key_idx[None, None, :] == query_idx[None, :, None])
        mask = mask[:, None]
        x = F.embedding(tokens.clamp(max=self.embed.shape[0] - 1), self.embed)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer, _rms_norm(x, layer.ln1, self.eps), positions, mask, cache, i, start)
            h = _rms_norm(x, layer.ln2, self.eps)
            x = x + (F.silu(h @ layer.w_gate.T) * (h @ layer.w_up.T)) @ layer.w_down.T
        if cache is not None:
            cache.length = total
        if last_only:
            x = x[:, -1]
        return _rms_norm(x, self.final_norm, self.eps) @ self.lm_head.T

    @torch.no_grad()
    def token_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """log p(token_i | tokens_<i) for i >= 1 of each sequence (one batch, left-padded)."""
        tokens, pad = left_pad(sequences, self.layout.eos_id)
        logp = torch.log_softmax(self.forward(tokens, pad).float(), dim=-1)
        out = []
        for row in range(len(sequences)):
            p = int(pad[row])
            targets = tokens[row, p + 1:].to(self.device)
            out.append(logp[row, p:-1].gather(-1, targets[:, None])[:, 0].cpu())
        return out


def left_pad(sequences: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` tokens with each sequence right-aligned, and the padding of each row."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every sequence needs at least one token")
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), fill, dtype=torch.long)
    pad = torch.tensor([width - len(s) for s in sequences], dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
    return tokens, pad
