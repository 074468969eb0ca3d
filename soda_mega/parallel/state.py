"""Process groups for a run: torch.distributed + Megatron-core's ``parallel_state``.

Works the same under torchrun (env:// rendezvous, NCCL on GPU) and in a single plain Python
process (a one-rank gloo group on a free local port), so the CLI, tests and demo share one
code path. On CPU the Megatron CUDA shims (:mod:`.cpu_shims`) are installed first.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from soda_mega.config.fields import ConfigError
from soda_mega.config.schema import ParallelConfig
from soda_mega.parallel import cpu_shims, megatron_compat


@dataclass(frozen=True)
class Layout:
    """Sizes of the parallel dimensions of this run and this process's coordinates."""

    tp: int
    pp: int
    dp: int
    vp: int | None
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> None:
    """Initialise torch.distributed once: from torchrun's env, else as a single process."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ:
        dist.init_process_group(backend=backend)
        return
    # NOTE: a plain process (tests, CLI) gets a private one-rank group. The rendezvous address
    # is passed explicitly instead of exported, so child processes (e.g. a torchrun launched
    # from a test) never inherit a RANK / MASTER_PORT that points at this process.
    dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1)


def initialize(parallel: ParallelConfig, seed: int, backend: str | None = None) -> Layout:
    """Create the TP / PP / DP groups of ``parallel`` over the current world and seed RNGs."""
    cpu_shims.install()
    megatron_compat.install()
    init_distributed(backend)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = dist.get_world_size()
    model_ranks = parallel.tensor_parallel * parallel.pipeline_parallel
    if world % model_ranks:
        raise ConfigError(
            f"parallel.tensor_parallel x parallel.pipeline_parallel = {model_ranks} must divide "
            f"the world size {world}"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
        _destroy_subgroups()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
    )
    # NOTE: Megatron offsets the seed per PP stage and per TP rank for dropout; weights made with
    # use_cpu_initialization come from the default generator, seeded identically everywhere.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        vp=ps.get_virtual_pipeline_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def shutdown(keep_process_group: bool = False) -> None:
    """Destroy the Megatron groups, and the default process group unless asked to keep it
    (to build another layout over the same processes)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if not dist.is_initialized():
        return
    if keep_process_group:
        _destroy_subgroups()
    else:
        dist.destroy_process_group()


def _destroy_subgroups() -> None:
    """Destroy every process group but the default one.

    NOTE: ``destroy_model_parallel`` only forgets Megatron's subgroups; each gloo group keeps
    its threads polling, so a process that builds layouts again and again (tests, ``eval``
    after ``import``, several trainers) would pile them up.
    """
    from torch.distributed.distributed_c10d import GroupMember, _world

    for group in list(_world.pg_map):
        if group is not GroupMember.WORLD:
            dist.destroy_process_group(group)
