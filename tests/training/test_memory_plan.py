"""The memory planner: its arithmetic by hand, its activation terms against the tensors autograd
really saves, and its peak against the CPU allocator's trace of real training steps; on a GPU,
against ``torch.cuda.max_memory_allocated`` (the issue's 10% target).

The CPU checks run the CPU code paths (unfused SwiGLU, ``target="cpu"``); what differs on a GPU
(the fused SwiGLU, the SDPA backend's saved tensors, the CUDA context) is what the GPU test
is for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soda_mega.config import load_config
from soda_mega.model.accounting import memory_per_rank
from soda_mega.training.plan import (
    GIB,
    MemoryAssumptions,
    in_flight,
    layer_activation_terms,
    loss_terms,
    plan_memory,
    rope_table_bytes,
)

# ----------------------------------------------------------------------------- by hand

HAND = ["--training.precision=bf16", "--parallel.tensor_parallel=2",
        "--parallel.sequence_parallel=true", "--parallel.pipeline_parallel=2",
        "--training.micro_batch_size=2", "--training.global_batch_size=8",
        "--kernels.loss=megatron"]


def test_plan_arithmetic_by_hand():
    """tiny (h 64, 4 layers, 4/2 heads of 16, FFN 176, seq 128, V 16,646), bf16, TP 2 + SP,
    PP 2, micro-batch 2, global batch 8 on 8 GPUs (DP 2: 2 micro-batches per replica)."""
    cfg = load_config(preset="tiny", overrides=HAND)
    # Per token and layer, e = 2, u = 4, q = 4*16/2 = 32, k = 2*16/2 = 16, f = 176/2 = 88:
    terms = layer_activation_terms(cfg, "cuda")
    assert terms["norms"] == 2 * ((4 + 2) * 64 + 4) / 2 == 388
    assert terms["linear_in"] == 2 * 2 * 64 / 2 == 128
    assert terms["qkv_out"] == 2 * (32 + 2 * 16) == 128
    assert terms["q_norm"] == 4 * 32 + 2 * 32 + 4 * 2 == 200
    assert terms["k_norm"] == 4 * 16 + 2 * 16 + 4 * 1 == 100
    assert terms["attention"] == 2 * 32 + 2 * 16 + 2 * 32 + 4 * 2 == 168
    assert terms["mlp"] == 3 * 2 * 88 == 528
    assert terms["total"] == 1640
    n = 128 * 2
    # Loss on the last stage: V padded to a multiple of 64*2 -> 16,768, 8,384 per TP rank.
    logits = n * 8384
    loss = loss_terms(cfg, n, "cuda")
    final_norm = n * (((4 + 2) * 64 + 4) / 2 + 2 * 64 / 2)            # 66,048
    assert loss["held"] == final_norm + 8 * logits == 17_236_480        # softmax + z-loss exp
    assert loss["forward_extra"] == (2 + 4 + 8) * logits - 8 * logits == 12_877_824
    assert loss["backward_extra"] == 2 * logits == 4_292_608
    plan = plan_memory(cfg, world_size=8, assumptions=MemoryAssumptions(target="cuda"))
    assert plan.data_parallel == 2 and plan.micro_batches == 2
    s0, s1 = plan.stages
    # Parameters per TP rank: layer matmuls (64*128 + 64*64 + 64*352 + 176*64) / 2 = 23,040
    # + norms 2*64 + 2*16 = 160 -> 23,200 per layer, 2 layers per stage; embedding / output
    # shard 8,384 * 64 = 536,576; final norm 64.
    assert (s0.parameters, s1.parameters) == (536_576 + 46_400, 46_400 + 64 + 536_576)
    # bf16 + distributed optimizer over DP 2: 2 + 4 + (4 + 8) / 2 = 12 bytes per parameter.
    assert s0.static == 12 * 582_976 and s1.static == 12 * 583_040
    # 1F1B: stage 0 holds min(pp - 0, 2) = 2 micro-batches, the last stage 1.
    assert (s0.in_flight, s1.in_flight) == (2, 1)
    # Each layer also keeps RoPE's cos/sin tables for q and k: 4 * e * s * head_dim = 16,384.
    rope = 4 * 2 * 128 * 16
    assert s0.activations == 2 * 2 * (1640 * n + rope) + 2 * n * 8     # + int64 token ids
    assert s0.pipeline_buffers == 2 * 2 * n * 64 / 2                   # sent outputs only
    assert s1.activations == 1 * 2 * (1640 * n + rope)
    assert s1.pipeline_buffers == 1 * 2 * n * 64 / 2                   # received inputs only
    # Stage 0's working set is one layer's backward: e*n*(2h/sp + 3f) + e*h*2f.
    assert s0.working_set == 2 * n * (64 + 3 * 88) + 2 * 64 * 176 == 190_464
    assert s1.working_set == 12_877_824 and s1.working_set_source == "megatron loss"
    assert s0.forward_backward_peak == 6_995_712 + 1_748_992 + 32_768 + 190_464
    assert s1.forward_backward_peak == 6_996_480 + 872_448 + 16_384 + 17_236_480 + 12_877_824
    # AdamW's foreach step: one fp32 temporary of the local shard (583,040 / 2 parameters).
    assert s1.optimizer_transient == 4 * 291_520
    assert plan.worst is s1 and plan.allocated_peak == 37_999_616
    assert plan.device_total == pytest.approx(37_999_616 * 1.05 + 1.25 * GIB)


def test_plan_reads_the_resolved_run():
    """A plan made from the command's ResolvedRun is the plan of the config on that world; a
    run resolved for another world size is refused rather than silently mixed in."""
    from soda_mega.run.resolved import resolve_run

    cfg = load_config(preset="tiny", overrides=HAND)
    run = resolve_run(cfg, 8)
    given = plan_memory(cfg, 8, resolved=run)
    assert given.to_dict() == plan_memory(cfg, 8).to_dict()
    assert (given.data_parallel, given.micro_batches) == (run.dp, run.grad_accum)
    assert loss_terms(cfg, 256, "cuda", resolved=run) == loss_terms(cfg, 256, "cuda")
    with pytest.raises(ValueError, match="resolved for 8 ranks, not 16"):
        plan_memory(cfg, 16, resolved=run)


def test_pipeline_in_flight_counts():
    cfg = load_config(preset="tiny", overrides=HAND)
    assert [in_flight(cfg, s, 8) for s in (0, 1)] == [(2, 2), (1, 2)]
    assert in_flight(cfg, 0, 1) == (1, 2)  # fewer micro-batches than stages
    vp = load_config(preset="tiny", overrides=HAND + ["--parallel.virtual_pipeline=2"])
    # Interleaved: 2(pp - i - 1) + (v - 1) pp + 1 chunk-micro-batches of L/(pp v) = 1 layer,
    # at most m*v of them.
    assert [in_flight(vp, s, 8) for s in (0, 1)] == [(5, 1), (3, 1)]
    assert in_flight(vp, 0, 2) == (4, 1)


def test_static_part_agrees_with_accounting():
    cfg = load_config(preset="soda-4b", overrides=["--parallel.tensor_parallel=4",
                                                   "--parallel.pipeline_parallel=4"])
    plan = plan_memory(cfg, world_size=64)
    mem = memory_per_rank(cfg, dp=4)
    stage = next(s for s in plan.stages if s.stage == mem["stage"])
    assert stage.static == mem["total_bytes"]


def test_recompute_modes_and_fused_loss_shrink_the_plan():
    base = ["--training.precision=bf16", "--training.micro_batch_size=2", "--kernels.loss=megatron"]
    plans = {mode: plan_memory(load_config(preset="soda-600m", overrides=base + [
        f"--training.recompute={mode}"]), 8) for mode in ("none", "selective", "full")}
    act = {k: p.worst.activations for k, p in plans.items()}
    # selective only drops the logsumexp (4 bytes per head per token and layer) with fused
    # attention; full keeps each layer's bf16 input.
    assert act["none"] - act["selective"] == 4 * 16 * 4096 * 2 * 28
    assert act["full"] == 2 * 1024 * 4096 * 2 * 28 + 4096 * 2 * 8
    fused = plan_memory(load_config(preset="soda-600m", overrides=base[:2] + ["--kernels.loss=triton"]), 8)
    assert fused.worst.loss_held < plans["none"].worst.loss_held / 50


# ----------------------------------------------------------------------------- CPU checks

def _saved_bytes_per_layer(cfg) -> list[float]:
    """Bytes of the storages each transformer layer saves for backward (parameters, and
    storages an earlier layer saved, excluded)."""
    from soda_mega.model.gpt import build_model
    from soda_mega.tokens import VocabLayout

    model = build_model(cfg)[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current, seen, per_layer = [None], set(), {}
    handles = []
    for i, layer in enumerate(model.decoder.layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        handles.append(layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            if current[0] is not None:
                per_layer[current[0]] = per_layer.get(current[0], 0) + storage.nbytes()
        return t

    s, b = cfg.model.seq_length, cfg.training.micro_batch_size
    layout = VocabLayout.from_config(cfg.vocab)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, layout.size, (b, s + 1), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids[:, :-1], torch.arange(s).expand(b, s), None, labels=ids[:, 1:],
              loss_mask=torch.ones(b, s))
    for h in handles:
        h.remove()
    return [per_layer[i] for i in sorted(per_layer)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_layer_terms_equal_the_tensors_autograd_saves(megatron_one_process, precision):
    cfg = load_config(preset="tiny", overrides=[f"--training.precision={precision}"])
    measured = _saved_bytes_per_layer(cfg)
    tokens = cfg.model.seq_length * cfg.training.micro_batch_size
    predicted = layer_activation_terms(cfg, "cpu")["total"] * tokens + rope_table_bytes(cfg)
    assert measured == [predicted] * cfg.model.num_layers, (measured, predicted)


def _trainer(tmp_path, overrides):
    from soda_mega.perf import harness

    base = load_config(preset="tiny", overrides=overrides)
    data = harness.synthetic_corpus(tmp_path / "corpus", base, min_tokens=60_000)
    return harness.measurement_config(base, tmp_path / "run", data)


@pytest.mark.parametrize("overrides", [
    [],
    ["--kernels.loss=torch"],
    ["--training.precision=bf16", "--training.recompute=full", "--model.num_layers=8"],
], ids=["megatron-fp32", "torch-loss", "bf16-full-recompute"])
def test_step_peak_matches_cpu_allocator_trace(tmp_path, overrides):
    """Peak bytes allocated during a steady-state step (CPU allocator events of the profiler,
    above what was allocated before the step) vs the plan's peak minus its static part."""
    from torch.profiler import ProfilerActivity, profile

    from soda_mega.perf import harness

    cfg = _trainer(tmp_path, overrides)
    trainer = harness.build_trainer(cfg)
    try:
        batches = harness.fetch_steps(trainer, 1)
        harness.run_steps(trainer, batches, 1)  # optimizer state now exists: steady state
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            harness.run_steps(trainer, batches, 1)
    finally:
        harness.release(trainer)
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    peak = max(e["args"]["Total Allocated"] for e in events
               if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    plan = plan_memory(cfg, 1, MemoryAssumptions(target="cpu"))
    predicted = plan.allocated_peak - plan.worst.static
    assert predicted == pytest.approx(peak, rel=0.01), (predicted / 2**20, peak / 2**20)


# ----------------------------------------------------------------------------- GPU check

@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [
    ["--training.micro_batch_size=2", "--kernels.loss=triton", "--kernels.embedding=triton"],
    ["--training.micro_batch_size=1", "--kernels.loss=megatron"],
    ["--training.micro_batch_size=2", "--training.recompute=full", "--kernels.loss=triton"],
], ids=["triton-mb2", "megatron-mb1", "full-recompute"])
def test_plan_within_10_percent_of_measured_peak_on_gpu(tmp_path, overrides):
    """soda-135m in bf16 on one GPU: torch.cuda.max_memory_allocated over a steady-state step
    (optimizer state allocated by a first step) within 10% of the planned allocated peak."""
    from soda_mega.perf import harness

    base = load_config(preset="soda-135m", overrides=["--training.precision=bf16",
                                                      "--training.global_batch_size=4", *overrides])
    data = harness.synthetic_corpus(tmp_path / "corpus", base, min_tokens=200_000)
    cfg = harness.measurement_config(base, tmp_path / "run", data)
    trainer = harness.build_trainer(cfg)
    try:
        batches = harness.fetch_steps(trainer, 1)
        harness.run_steps(trainer, batches, 1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        harness.run_steps(trainer, batches, 1)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
    finally:
        harness.release(trainer)
    predicted = plan_memory(cfg, 1).allocated_peak
    assert predicted == pytest.approx(measured, rel=0.10), (predicted / GIB, measured / GIB)


def test_dry_run_and_bench_memory_print_the_plan(capsys):
    from soda_mega.cli import main

    root = Path(__file__).resolve().parents[2]
    assert main(["train", "--config", str(root / "launchers/configs/soda-1.7b.yaml"), "--dry-run",
                 "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    for item in ("gradient buffer (fp32 main_grad)", "CUDA context + NCCL buffers (assumed)",
                 "allocated peak (torch.cuda.max_memory_allocated)", "working set"):
        assert item in out
    assert main(["bench", "memory", "--world-size", "8", "--micro-batch", "2"]) == 0
    table = capsys.readouterr().out
    for preset in ("soda-135m", "soda-600m", "soda-1.7b", "soda-4b"):
        assert preset in table
    assert main(["bench", "memory", "--preset", "soda-4b", "--world-size", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)[0]["plan"]
    assert plan["device_total"] > 80 * GIB  # 4B with Adam on one GPU cannot fit an H100
