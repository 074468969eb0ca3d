"""Process groups for a run: torch.distributed + Megatron-core's ``parallel_state``.

Works the same under torchrun (env:// rendezvous, NCCL on GPU) and in a single plain Python
process (a one-rank gloo group on a free local port), so the CLI, tests and demo share one
code path. On CPU the Megatron CUDA shims (:mod:`.cpu_shims`) are installed first.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from soda_mega.config.fields import ConfigError
from soda_mega.config.schema import ParallelConfig
from soda_mega.parallel import cpu_shims, megatron_compat
from soda_mega.utils import lifetime


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


def init_distributed(backend: str | None = None, init_timeout_s: float = 1800.0,
                     collective_timeout_s: float = 1800.0) -> None:
    """Initialise torch.distributed once: from torchrun's env, else as a single process.

    ``init_timeout_s`` bounds the rendezvous (every rank waiting for the others to join, and
    the key-value store the process groups are created through); ``collective_timeout_s``
    bounds each collective of the default group (``parallel.init_timeout_s`` and
    ``parallel.collective_timeout_s``)."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ:
        url, rank, world = "env://", -1, -1
    else:
        # NOTE: a plain process (tests, CLI) gets a private one-rank group. The rendezvous
        # address is passed explicitly instead of exported, so child processes (e.g. a torchrun
        # launched from a test) never inherit a RANK / MASTER_PORT that points at this process.
        url, rank, world = f"tcp://127.0.0.1:{_free_port()}", 0, 1
    # NOTE: init_process_group(timeout=...) would use one timeout for both; rendezvous first
    # with the init timeout, then hand the store over with the collective timeout (the same
    # steps init_process_group takes itself).
    init_timeout = timedelta(seconds=init_timeout_s)
    store, rank, world = next(dist.rendezvous(url, rank, world, timeout=init_timeout))
    store.set_timeout(init_timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=collective_timeout_s))


def initialize(parallel: ParallelConfig, seed: int, backend: str | None = None) -> Layout:
    """Create the TP / PP / DP groups of ``parallel`` over the current world and seed RNGs."""
    cpu_shims.install()
    megatron_compat.install()
    # Helper processes (DataLoader workers, Megatron's checkpoint writers) end with this one.
    lifetime.children_die_with_this_process()
    lifetime.adopt_megatron_writer_queue()
    init_distributed(backend, parallel.init_timeout_s, parallel.collective_timeout_s)
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
        distributed_timeout_minutes=parallel.collective_timeout_s / 60,
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


def leave_together() -> None:
    """The end of a run that every rank reaches (finished, stopped on a signal, diverged): wait
    for the others, then destroy the groups.

    NOTE: torchrun counts any exit code but 0 as a failure and stops the workers still running
    when the first one leaves; a rank that left as soon as it was done (exit 4 after a stop
    signal) got the others, still closing their files, killed by SIGTERM. Destroying the groups
    before exit also ends NCCL's warning about groups left to the interpreter's teardown."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        shutdown()


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
