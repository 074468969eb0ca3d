"""Map between full (unsharded) weights and this rank's tensor/pipeline-parallel shards.

Full weights are keyed by *global* parameter names (``decoder.layers.<global index>...``) and
hold the whole tensor; a rank's chunk holds local layer indices and TP slices. The rules:

=====================================  ==============================================
parameter                              TP split
=====================================  ==============================================
embedding / output_layer weight        rows (vocabulary), padded rows may differ per TP
linear_qkv weight                      rows; Megatron stores QKV grouped by KV group
                                       ([q heads of group g, k_g, v_g] for each g), so
                                       a contiguous row split keeps whole groups
linear_fc1 weight (SwiGLU)             rows of the gate half and of the up half *each*
                                       (a plain split would give rank 0 only gates)
linear_proj, linear_fc2 weight         columns
norms (incl. q/k norm)                 replicated
=====================================  ==============================================

Used to load identical weights into any layout (parallel-equivalence tests, HF import) and to
compare gradients shard by shard against a single-process run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _split_kind(name: str) -> str:
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return "vocab"
    if name.endswith("linear_qkv.weight"):
        return "rows"
    if name.endswith("linear_fc1.weight"):
        return "swiglu"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "cols"
    if name.endswith("norm.weight"):
        return "replicated"
    raise KeyError(f"no sharding rule for parameter {name!r}")


def to_global_name(local_name: str, layer_offset: int) -> str:
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"


def local_slice(name: str, full: torch.Tensor, tp_rank: int, tp_size: int,
                local_shape: torch.Size) -> torch.Tensor:
    """The part of the full tensor ``full`` that TP rank ``tp_rank`` holds (shape ``local_shape``)."""
    kind = _split_kind(name)
    if kind == "replicated":
        return full
    if kind == "vocab":
        rows = local_shape[0]
        needed = rows * tp_size
        if full.shape[0] < needed:  # padded rows of a larger TP: never predicted, zero them
            pad = full.new_zeros(needed - full.shape[0], *full.shape[1:])
            full = torch.cat([full, pad], 0)
        return full[tp_rank * rows:(tp_rank + 1) * rows]
    if kind == "rows":
        return full.chunk(tp_size, 0)[tp_rank]
    if kind == "cols":
        return full.chunk(tp_size, 1)[tp_rank]
    gate, up = full.chunk(2, 0)
    return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0)


def _chunk_offset(chunk) -> int:
    return get_transformer_layer_offset(chunk.config, vp_stage=getattr(chunk, "vp_stage", None))


def named_local_params(chunks: Iterable[torch.nn.Module]):
    """(global name, local name, parameter) for every parameter of this rank's chunks."""
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)  # unwrap Megatron DDP
        offset = _chunk_offset(module)
        for local_name, param in module.named_parameters():
            yield to_global_name(local_name, offset), local_name, param


def load_full_weights(chunks, full: dict[str, torch.Tensor]) -> None:
    """Copy full weights into this rank's (sharded) chunks; every local parameter must be found."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for gname, _, param in named_local_params(chunks):
            if gname not in full:
                raise KeyError(f"full weights have no entry for {gname!r}")
            src = local_slice(gname, full[gname], tp_rank, tp_size, param.shape)
            if src.shape != param.shape:
                raise ValueError(f"{gname}: shard {tuple(src.shape)} != parameter {tuple(param.shape)}")
            param.copy_(src)


def full_weights_single_process(chunks) -> dict[str, torch.Tensor]:
    """Global-name -> tensor copy of a TP=1, PP=1 model's weights."""
    if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("full_weights_single_process needs TP=1 and PP=1")
    return {g: p.detach().clone() for g, _, p in named_local_params(chunks)}
