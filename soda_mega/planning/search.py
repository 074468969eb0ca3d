"""Every layout of a soda-mega run that fits memory, ranked by predicted step time.

Candidates: TP (inside a node) x PP x virtual stages x sequence parallelism x micro-batch x
recompute, on the given GPU count, with the config's global batch. Each is checked by the
config's own rules, then by the existing memory planner
(:func:`soda_mega.training.plan.plan_memory`, device total against the GPU's memory), then
timed by :func:`soda_mega.planning.steptime.step_time` with the kernels the config selects
(soda-mega's own: no Transformer Engine).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from soda_mega.config.fields import ConfigError
from soda_mega.config.schema import SodaConfig
from soda_mega.planning.constants import Efficiencies
from soda_mega.planning.hardware import GpuSpec
from soda_mega.planning.shapes import SODA_STACK, Layout, Stack, layout_of, shape_of
from soda_mega.planning.steptime import StepTime, step_time

MICRO_BATCHES = (1, 2, 4, 8)
RECOMPUTE = ("none", "selective", "full")
MAX_VP = 4


@dataclass
class Candidate:
    """One layout that fits, with its prediction and memory."""

    cfg: SodaConfig
    layout: Layout
    time: StepTime
    memory_gib: float

    def overrides(self) -> str:
        """The ``--parallel.* --training.*`` line that selects this layout."""
        lay = self.layout
        return " ".join([
            f"--parallel.tensor_parallel={lay.tp}", f"--parallel.pipeline_parallel={lay.pp}",
            f"--parallel.virtual_pipeline={lay.vp if lay.vp > 1 else 'none'}",
            f"--parallel.sequence_parallel={str(lay.sp).lower()}",
            f"--training.micro_batch_size={lay.micro_batch}",
            f"--training.recompute={lay.recompute}"])

    def row(self, tokens: float) -> dict:
        from soda_mega.perf.cost import gpu_hours, wall_days

        t, lay = self.time, self.layout
        hours = gpu_hours(tokens, t.tokens_per_s_per_gpu)
        return {"layout": lay.label(), "tp": lay.tp, "pp": lay.pp, "vp": lay.vp, "dp": lay.dp,
                "micro_batch": lay.micro_batch, "recompute": lay.recompute,
                "sequence_parallel": lay.sp, "step_s": t.seconds,
                "tokens_per_s_per_gpu": t.tokens_per_s_per_gpu, "mfu": t.mfu,
                "memory_gib": self.memory_gib, "gpu_hours": hours,
                "days": wall_days(hours, lay.gpus), "overrides": self.overrides()}


def stack_of(cfg: SodaConfig) -> Stack:
    """soda-mega's stack with the loss the config selects (megatron, or the fused kernel)."""
    fused = cfg.kernels.loss in ("auto", "triton", "torch")
    loss = "fused Triton loss" if fused else "Megatron loss (kernels.loss=megatron)"
    return dataclasses.replace(SODA_STACK, loss="soda_fused" if fused else "megatron",
                               name=f"soda-mega's kernels (flash/SDPA attention, {loss}, no "
                                    "Transformer Engine)")


def with_layout(cfg: SodaConfig, tp: int, pp: int, vp: int, sp: bool, mbs: int,
                recompute: str) -> SodaConfig:
    par = dataclasses.replace(cfg.parallel, tensor_parallel=tp, pipeline_parallel=pp,
                              virtual_pipeline=vp if vp > 1 else None, sequence_parallel=sp)
    tr = dataclasses.replace(cfg.training, micro_batch_size=mbs, recompute=recompute)
    return dataclasses.replace(cfg, parallel=par, training=tr)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_configs(cfg: SodaConfig, gpus: int, gpus_per_node: int):
    """Configs of every layout the config's rules allow on ``gpus`` GPUs."""
    m, gbs = cfg.model, cfg.training.global_batch_size
    for tp in _divisors(min(gpus, gpus_per_node)):
        for pp in _divisors(m.num_layers):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            vps = [1] + ([v for v in range(2, MAX_VP + 1)] if pp > 1 else [])
            for vp in vps:
                for sp in ((False, True) if tp > 1 else (False,)):
                    for mbs in MICRO_BATCHES:
                        if gbs % (dp * mbs):
                            continue
                        for rec in RECOMPUTE:
                            c = with_layout(cfg, tp, pp, vp, sp, mbs, rec)
                            try:
                                c.parallel.check(c.model)
                            except ConfigError:
                                continue
                            lay = layout_of(c, gpus, gpus_per_node)
                            # the batch split and the interleaved schedule's rule (the
                            # vocabulary does not matter to these checks)
                            if lay.check(shape_of(c, 1)) is None:
                                yield c


def rank_layouts(cfg: SodaConfig, gpus: int, gpu: GpuSpec, gpus_per_node: int = 8,
                 eff: Efficiencies | None = None, headroom: float = 1.0,
                 vocab=None) -> list[Candidate]:
    """Every layout of ``cfg`` on ``gpus`` GPUs whose predicted device memory fits the GPU,
    fastest first; ``vocab``: the run's VocabLayout when the caller resolved it already."""
    from soda_mega.run.resolved import resolve_run
    from soda_mega.tokens.layout import VocabLayout
    from soda_mega.training.plan import GIB, MemoryAssumptions, plan_memory

    eff = eff or Efficiencies()
    vocab = vocab or VocabLayout.from_config(cfg.vocab)
    shape = shape_of(cfg, vocab.size)
    stack = stack_of(cfg)
    out = []
    for c in candidate_configs(cfg, gpus, gpus_per_node):
        plan = plan_memory(c, gpus, MemoryAssumptions(target="cuda"),
                           resolved=resolve_run(c, gpus, vocab))
        if plan.device_total > gpu.memory_gib * GIB * headroom:
            continue
        lay = layout_of(c, gpus, gpus_per_node)
        out.append(Candidate(c, lay, step_time(shape, lay, gpu, stack, eff),
                             plan.device_total / GIB))
    out.sort(key=lambda cand: cand.time.seconds)
    return out


def rank_of(cfg: SodaConfig, gpus: int, gpu: GpuSpec, gpus_per_node: int = 8,
            eff: Efficiencies | None = None,
            vocab=None) -> tuple[int | None, list[Candidate], StepTime]:
    """(1-based rank of ``cfg``'s own layout among those that fit, or None when it does not
    fit; the ranking; its own predicted step)."""
    ranked = rank_layouts(cfg, gpus, gpu, gpus_per_node, eff, vocab=vocab)
    own = layout_of(cfg, gpus, gpus_per_node)
    size = vocab.size if vocab is not None else None
    own_time = step_time(shape_of(cfg, size), own, gpu, stack_of(cfg), eff)
    for i, cand in enumerate(ranked, 1):
        if cand.layout == own:
            return i, ranked, own_time
    return None, ranked, own_time


def rank_line(cfg: SodaConfig, gpus: int, gpu_name: str = "h100-sxm", vocab=None) -> str:
    """One line for ``train --dry-run``: where this layout ranks among those that fit."""
    from soda_mega.planning.hardware import gpu_spec

    gpu = gpu_spec(gpu_name)
    try:
        rank, ranked, own = rank_of(cfg, gpus, gpu, vocab=vocab)
    except ValueError as err:
        return f"soda-mega plan: cannot rank this layout: {err}"
    head = f"soda-mega plan ({gpu.name}, predicted): this layout "
    if not ranked:
        return head + "has no layout that fits to rank against"
    best = ranked[0]
    where = (f"ranks {rank} of {len(ranked)} that fit" if rank else
             f"does not fit {gpu.memory_gib:g} GiB; {len(ranked)} others do")
    return (f"{head}{where}, {own.seconds:.3g} s per step; best {best.time.seconds:.3g} s: "
            f"{best.overrides()}")
