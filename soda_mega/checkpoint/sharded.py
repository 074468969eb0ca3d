"""What Megatron's ``dist_checkpointing`` saves and loads: the model chunks and the optimizer.

Model weights and optimizer state are saved by global parameter name in "model space"
(Megatron's ``fully_reshardable`` format for the distributed optimizer: gathered per DP group
at save time, sliced per rank at load time), so a checkpoint loads into another TP / PP / DP
layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Distributed-optimizer state in a layout-free form, so checkpoints reshard over TP, PP and DP.
SHARDING = "fully_reshardable"


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def optimizer_metadata() -> dict:
    # NOTE: the default fully_reshardable path gathers over the NCCL data-parallel group with
    # CUDA tensors; on CPU the memory-efficient variant gathers over Megatron's gloo group.
    return {"distrib_optim_sharding_type": SHARDING,
            "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


def unwrap(model) -> list:
    return [getattr(m, "module", m) for m in model]


def model_sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
