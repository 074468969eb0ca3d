"""Training throughput and MFU per preset, kernels and attention compared in one run (issue 6).

For every case (a preset with the settings it runs with) and every kernel variant, the real
training step (:meth:`Trainer.train_step`: Megatron schedules, DDP, optimizer) runs
``--warmup`` steps untimed, then ``--steps`` timed steps on a synthetic corpus. Reported per
GPU: tokens/s, model TFLOP/s (the exact FLOPs of :mod:`soda_mega.model.accounting`, full
attention; the causal count too), MFU against the spec-sheet peak and against a matmul peak
measured in the same run (:mod:`.gemm`), the predicted (:mod:`soda_mega.training.plan`) and
measured peak memory, and GPU telemetry (:mod:`soda_mega.utils.telemetry`). Model FLOPs do
not count recomputation.

Variants (``--variants``; a variant that cannot run here is skipped with the reason):

==============  ======================  ==========  ===========
name            kernels.loss            embedding   attention
==============  ======================  ==========  ===========
triton          triton (fused)          triton      sdpa
torch           torch (chunked)         torch       sdpa
megatron        megatron (full logits)  megatron    sdpa
triton+flash    triton                  triton      flash-attn
==============  ======================  ==========  ===========

Cases: on a GPU each SODA preset with the micro-batch and recompute of its launcher config
(``launchers/configs/<preset>.yaml``), TP/PP reduced to what the world size allows and
``--accum`` micro-batches per step; a case the memory plan says will not fit is skipped with
the prediction as the reason. ``--smoke`` (CPU, seconds): the ``tiny`` preset and
``soda-135m-smoke``, soda-135m's full 144,644-id vocabulary on a 2-layer, 128-wide model; CPU
numbers (an fp32 GEMM peak, no spec peak) only show that the pipeline works.

Results: ``bench_throughput_<device>[_smoke].json`` (stamped with device, driver, versions and
commit), ``.md`` and ``.png`` in ``--out-dir``, all from one command::

    python benchmarks/bench_throughput.py            # or: soda-mega bench throughput
    python benchmarks/bench_throughput.py --smoke    # CPU, < 60 s
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" if (REPO / "benchmarks").is_dir() \
    else Path("benchmarks") / "results"
SODA_PRESETS = ("soda-135m", "soda-600m", "soda-1.7b", "soda-4b")

#: CPU smoke cases: base preset and overrides. soda-135m-smoke keeps the SODA vocabulary, the
#: part that makes soda-135m hard, on a model two CPU cores step through in about a second.
SMOKE_CASES = {
    "tiny": ("tiny", ["--model.seq_length=128", "--training.micro_batch_size=2"]),
    "soda-135m-smoke": ("soda-135m", [
        "--model.hidden_size=128", "--model.num_layers=2", "--model.num_attention_heads=2",
        "--model.num_kv_heads=2", "--model.head_dim=64", "--model.ffn_hidden_size=448",
        "--model.seq_length=128", "--training.precision=fp32", "--training.micro_batch_size=1"]),
}

VARIANTS = {
    "triton": {"loss": "triton", "embedding": "triton", "attention": "sdpa"},
    "torch": {"loss": "torch", "embedding": "torch", "attention": "sdpa"},
    "megatron": {"loss": "megatron", "embedding": "megatron", "attention": "sdpa"},
    "triton+flash": {"loss": "triton", "embedding": "triton", "attention": "flash"},
}
BASELINE = "megatron"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true",
                   help="CPU mode: tiny shapes, 1 warm-up + 2 timed steps (the test suite runs it)")
    p.add_argument("--presets", nargs="+", metavar="NAME",
                   help=f"cases to run (default: {', '.join(SODA_PRESETS)}; smoke: "
                        f"{', '.join(SMOKE_CASES)})")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="kernel variants (default: all)")
    p.add_argument("--steps", type=int, help="timed steps per case (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; smoke 1)")
    p.add_argument("--accum", type=int, help="micro-batches per step per GPU (default 4; smoke 2)")
    p.add_argument("--micro-batch", type=int, help="micro-batch size for every case")
    p.add_argument("--recompute", choices=("none", "selective", "full"), help="for every case")
    p.add_argument("--peak-tflops", type=float,
                   help="spec peak per GPU for MFU (default: looked up from the GPU name)")
    p.add_argument("--gemm-n", type=int, help="matmul benchmark size (default 8192; smoke 1024)")
    p.add_argument("--configs-dir", type=Path, default=REPO / "launchers" / "configs",
                   help="where <preset>.yaml launcher configs give each preset's settings")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def _defaults(args) -> None:
    smoke = args.smoke
    for name, full, small in (("steps", 10, 2), ("warmup", 3, 1), ("accum", 4, 2),
                              ("gemm_n", 8192, 1024)):
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)
    if args.presets is None:
        args.presets = list(SMOKE_CASES) if smoke else list(SODA_PRESETS)


# ----------------------------------------------------------------------------- cases
def case_config(name: str, args, world: int, overrides: list[str]):
    """(config, notes) of one case before the kernel variant and measurement settings."""
    from soda_mega.config import load_config

    notes = []
    if name in SMOKE_CASES:
        preset, extra = SMOKE_CASES[name]
        cfg = load_config(preset=preset, overrides=extra)
    else:
        path = args.configs_dir / f"{name}.yaml"
        cfg = load_config(path if path.is_file() else None, preset=None if path.is_file() else name)
        if path.is_file():
            notes.append(f"settings from {path.name}")
    p = cfg.parallel
    extra = []
    if world % (p.tensor_parallel * p.pipeline_parallel):
        notes.append(f"TP {p.tensor_parallel} x PP {p.pipeline_parallel} does not fit {world} GPU(s): "
                     "run with TP 1, PP 1")
        extra += ["--parallel.tensor_parallel=1", "--parallel.pipeline_parallel=1",
                  "--parallel.sequence_parallel=false", "--parallel.virtual_pipeline=null"]
    if args.micro_batch:
        extra.append(f"--training.micro_batch_size={args.micro_batch}")
    if args.recompute:
        extra.append(f"--training.recompute={args.recompute}")
    from soda_mega.perf.harness import with_overrides

    cfg = with_overrides(cfg, extra + overrides)
    dp = world // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    gbs = cfg.training.micro_batch_size * args.accum * dp
    return with_overrides(cfg, [f"--training.global_batch_size={gbs}"]), notes


def variant_unavailable(variant: str) -> str | None:
    """Why ``variant`` cannot run on this machine, or None."""
    from soda_mega.utils.optional import flash_attn_func

    spec = VARIANTS[variant]
    cuda = torch.cuda.is_available()
    reasons = []
    if "triton" in (spec["loss"], spec["embedding"]) and not cuda:
        reasons.append("the Triton kernels need CUDA (on a CPU they only run in Triton's "
                       "interpreter, whose time says nothing)")
    if spec["attention"] == "flash":
        if not cuda:
            reasons.append("flash-attn needs CUDA")
        elif flash_attn_func() is None:
            reasons.append("flash-attn is not installed (pip install 'soda-mega[flash]')")
    return "; ".join(reasons) or None


def _median_spread(values: list[float]) -> tuple[float, float]:
    med = statistics.median(values)
    return med, (max(values) - min(values)) / med if med else 0.0


def run_case(name: str, variant: str, base_cfg, notes: list[str], args, world: int, data: list[str],
             tmp: Path, telemetry, gemm: dict, spec_peak: float | None) -> dict:
    """Build, warm up and time one case x variant; a row of the results."""
    from soda_mega.model.accounting import flops_per_token
    from soda_mega.perf import harness
    from soda_mega.tokens.layout import VocabLayout
    from soda_mega.training.plan import GIB, MemoryAssumptions, plan_memory

    spec = VARIANTS[variant]
    cfg = harness.measurement_config(
        base_cfg, tmp / f"{name}-{variant}".replace("+", "_"), data,
        [f"--kernels.loss={spec['loss']}", f"--kernels.embedding={spec['embedding']}",
         f"--kernels.attention={spec['attention']}"])
    m, t, p = cfg.model, cfg.training, cfg.parallel
    row = {"case": name, "model": m.name, "variant": variant, "kernels": dict(spec),
           "settings": {"seq_length": m.seq_length, "micro_batch_size": t.micro_batch_size,
                        "micro_batches_per_step": args.accum, "global_batch_size": t.global_batch_size,
                        "precision": t.precision, "recompute": t.recompute,
                        "tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
                        "sequence_parallel": p.sequence_parallel, "world_size": world},
           "notes": list(notes)}
    reason = variant_unavailable(variant)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    cuda = torch.cuda.is_available()
    plan = plan_memory(cfg, world, MemoryAssumptions(target="cuda" if cuda else "cpu"))
    row["memory"] = {"predicted_allocated_gib": plan.allocated_peak / GIB,
                     "predicted_device_total_gib": plan.device_total / GIB}
    if cuda:
        capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if plan.device_total > 0.97 * capacity:
            return {**row, "status": "skipped",
                    "reason": f"memory plan predicts {plan.device_total / GIB:.1f} GiB, more than "
                              f"this GPU's {capacity / GIB:.1f} GiB (try --micro-batch / "
                              "--recompute full, or more GPUs under torchrun)"}
    trainer = None
    try:
        trainer = harness.build_trainer(cfg)
        batches = harness.fetch_steps(trainer, min(args.steps + args.warmup, 4))
        warm = harness.run_steps(trainer, batches, args.warmup)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        telemetry.reset()
        telemetry.start()
        records = harness.run_steps(trainer, batches, args.steps)
        row["telemetry"] = telemetry.stop()
        if cuda:
            row["memory"]["measured_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["memory"]["predicted_over_measured"] = (
                row["memory"]["predicted_allocated_gib"] / row["memory"]["measured_peak_allocated_gib"])
    except Exception as err:  # noqa: BLE001 - one failing case must not lose the others
        telemetry.stop()
        oom = isinstance(err, torch.cuda.OutOfMemoryError)
        return {**row, "status": "error",
                "reason": ("out of memory: " if oom else f"{type(err).__name__}: ") + str(err)[:400]}
    finally:
        if trainer is not None:
            harness.release(trainer)
    vocab = VocabLayout.from_config(cfg.vocab).size
    fpt = flops_per_token(m, vocab).training
    fpt_causal = flops_per_token(m, vocab, causal=True).training
    seconds = [r["step_seconds"] for r in records]
    median, spread = _median_spread(seconds)
    tokens = t.global_batch_size * m.seq_length
    tps = tokens / median / world
    tflops = fpt * tps / 1e12
    row.update({
        "status": "ok",
        "warmup_steps": len(warm), "timed_steps": len(records),
        "step_seconds": seconds, "step_seconds_median": median, "step_seconds_spread": spread,
        "tokens_per_step": tokens,
        "tokens_per_s_per_gpu": tps,
        "training_flops_per_token": fpt, "training_flops_per_token_causal": fpt_causal,
        "model_tflops_per_gpu": tflops,
        "model_tflops_per_gpu_causal": fpt_causal * tps / 1e12,
        "mfu_vs_spec_peak": tflops / spec_peak if spec_peak else None,
        "mfu_vs_spec_peak_causal": fpt_causal * tps / 1e12 / spec_peak if spec_peak else None,
        "mfu_vs_measured_gemm": tflops / gemm["tflops"],
        "final_loss": records[-1]["loss"],
        "skipped_updates": sum(bool(r["skipped"]) for r in records),
    })
    return row


def comparisons(rows: list[dict]) -> list[dict]:
    """Per case: tokens/s of each variant over the megatron path, and flash-attn over SDPA."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        ok = {r["variant"]: r["tokens_per_s_per_gpu"] for r in rows
              if r["case"] == case and r["status"] == "ok"}
        item = {"case": case}
        if BASELINE in ok:
            item[f"speedup_vs_{BASELINE}"] = {v: tps / ok[BASELINE] for v, tps in ok.items()}
        if "triton" in ok and "triton+flash" in ok:
            item["flash_over_sdpa"] = ok["triton+flash"] / ok["triton"]
        out.append(item)
    return out


# ----------------------------------------------------------------------------- main
def run(args, overrides: list[str] | None = None) -> int:
    _defaults(args)
    from soda_mega.parallel import state
    from soda_mega.perf import harness
    from soda_mega.perf.gemm import matmul_peak
    from soda_mega.perf.report import markdown, plot
    from soda_mega.training.metrics import peak_tflops
    from soda_mega.utils.provenance import write_json
    from soda_mega.utils.telemetry import GpuTelemetry

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("soda-mega: no CUDA GPU here: only --smoke runs on a CPU (its numbers measure "
              "nothing about a GPU)", file=sys.stderr)
        return 2
    state.init_distributed()
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    dev = harness.device()
    gemm = matmul_peak(dev, torch.bfloat16 if cuda else torch.float32, args.gemm_n,
                       iters=20 if cuda else 10, warmup=5 if cuda else 2)
    spec_peak = peak_tflops(args.peak_tflops) if cuda else None
    telemetry = GpuTelemetry(interval_s=0.2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="soda-bench-") as tmp_name:
        tmp = Path(tmp_name)
        corpora: dict[str, list[str]] = {}
        for name in args.presets:
            base, notes = case_config(name, args, world, list(overrides or []))
            key = json.dumps(base.vocab.__dict__, sort_keys=True, default=str)
            if key not in corpora:
                need = base.training.global_batch_size * (base.model.seq_length + 1) * 4
                corpora[key] = harness.synthetic_corpus(tmp / f"corpus{len(corpora)}", base,
                                                        min_tokens=max(need, 200_000))
            for variant in args.variants:
                row = run_case(name, variant, base, notes, args, world, corpora[key], tmp,
                               telemetry, gemm, spec_peak)
                rows.append(row)
                if rank == 0:
                    print(_progress(row), flush=True)
    telemetry.close()
    if rank != 0:
        return 0
    payload = {
        "benchmark": "throughput",
        "smoke": bool(args.smoke),
        "settings": {"steps": args.steps, "warmup": args.warmup, "accum": args.accum,
                     "world_size": world, "variants": args.variants, "overrides": overrides or []},
        "matmul_peak": gemm,
        "spec_peak_tflops": spec_peak,
        "telemetry_notice": telemetry.notice,
        "rows": rows,
        "comparisons": comparisons(rows),
    }
    out_dir = Path(args.out_dir)
    stem = f"bench_throughput_{dev.type}{'_smoke' if args.smoke else ''}"
    path = write_json(out_dir / f"{stem}.json", payload)
    stamped = json.loads(path.read_text())
    if not args.no_plot:
        stamped["plot"] = plot(stamped, out_dir / f"{stem}.png")
    (out_dir / f"{stem}.md").write_text(markdown(stamped))
    print(f"wrote {path}, {stem}.md" + ("" if args.no_plot else f", {stem}.png"))
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def _progress(row: dict) -> str:
    head = f"[bench] {row['case']:<16} {row['variant']:<13}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['reason']}"
    mfu = row["mfu_vs_spec_peak"]
    return (f"{head} {row['tokens_per_s_per_gpu']:>12,.0f} tokens/s/GPU  "
            f"{row['model_tflops_per_gpu']:8.3f} TFLOP/s  "
            f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'} (spec), "
            f"{row['mfu_vs_measured_gemm']:.1%} (measured GEMM)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a)]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like "
                     "--section.key=value)")
    return run(args, extra)


if __name__ == "__main__":
    sys.exit(main())
