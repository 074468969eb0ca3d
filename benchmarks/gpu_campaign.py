"""The GPU campaign (issue 15): every GPU figure the project claims, from one command.

Phases run in order, each in its own child process with its own time budget, and each writes
its results into ``--out`` as it goes, so a phase that fails, hangs or runs out of time leaves
the others' results (and its own partial ones) in place:

==================  =========================================================================
env                 GPU, driver, versions; bf16 8192^3 matmul peak and device-to-device copy
                    bandwidth, measured in this run
pytest              ``pytest -m gpu`` (bf16 full-shape kernel tests, decoder, memory planner)
kernels             the loss baselines (torch eager, torch.compile, Megatron, Liger, CCE) and the
                    embedding baselines (torch, Megatron, torch + a separate modality pass) at
                    SODA shapes (``benchmarks/bench_kernels.py`` functions)
kernels_triton      the fused Triton loss (recompute path; under the training contract with an
                    fp32 main_grad both designs x both GEMM engines, Triton and cuBLAS, and the
                    measured choice with the roofline's prediction) and embedding at the same
                    shapes
throughput          ``Trainer.train_step`` of soda-135m / 1.7b / 600m / 4b with the megatron
                    kernels: tokens/s, TFLOP/s, MFU (``soda_mega/perf/throughput.py``)
throughput_triton   the same with the triton kernels
planner             the memory plan's prediction vs ``max_memory_allocated`` of each run above
profile             a short ``torch.profiler`` breakdown of soda-1.7b
checkpoint          the save stall of soda-135m, sync vs async (``benchmarks/bench_checkpoint.py``)
megatron_newest     information only: does the newest megatron-core import and train a step
plan_layouts        a few layouts (micro-batch, recompute) of soda-135m timed, with the
                    step-time model's prediction beside each (``soda_mega/planning``)
==================  =========================================================================

The Triton kernels have never run on a GPU, so they run in processes of their own: a sticky
CUDA error there cannot void the baselines. A phase gets its budget plus whatever earlier
phases left unused, never more than the
campaign's ``--total-s``; inside a phase, cases are skipped cleanly (and listed as skipped)
when the time left will not hold them. Adding a phase is one :func:`register` line: a Python
function run in a child process, or an external command (``{python}``, ``{out}`` and
``{phase_dir}`` are filled in), for example::

    register(Phase("codec", 60, 150, "Mimi codec throughput",
                   command=("{python}", "benchmarks/bench_codec.py", "--out-dir", "{phase_dir}"),
                   smoke_args=("--smoke",)))

Output (``--out``): ``campaign.json`` (phases, status, seconds, targets), ``summary.md``,
``<phase>.json`` per Python phase, ``logs/<phase>.log``, and with ``--bundle FILE.tar.gz`` all
of it packed after every phase (the device tool returns at most 8 files). Turn it into
``benchmarks/results/gpu_<device>_<date>.{json,md,png}`` with
``python -m soda_mega.perf.campaign_report convert OUT``.

    python benchmarks/gpu_campaign.py --out /tmp/campaign --bundle $OUT/campaign.tar.gz
    python benchmarks/gpu_campaign.py --smoke --out /tmp/smoke   # CPU, tiny shapes, ~1 min

``--smoke`` runs every phase at tiny shapes on a CPU (Triton interpreter, fp32): it shows the
campaign works end to end and nothing about a GPU; its results are labelled CPU smoke.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/gpu_campaign.py` puts benchmarks/ first
    sys.path.insert(0, str(REPO))

#: the whole campaign, seconds (the device tool allows 600 s a command; setup needs some)
TOTAL_S = 530.0
SMOKE_TOTAL_S = 900.0  # a cap for slow CI machines; a smoke run takes about a minute of CPU
#: files larger than this stay out of the bundle (the device tool returns <= 16 MiB a file)
BUNDLE_FILE_LIMIT = 6 << 20


# ----------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class Phase:
    """One step of the campaign.

    ``run`` is called in a child process with a :class:`Context`; or ``command`` is run as it
    is (placeholders ``{python}``, ``{out}``, ``{phase_dir}``; ``smoke_args`` appended with
    ``--smoke``). Budgets are seconds on the GPU and in ``--smoke``.
    """

    name: str
    budget_s: float
    smoke_budget_s: float
    help: str
    run: Callable[[Context], None] | None = None
    command: tuple[str, ...] | None = None
    smoke_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.run is None) == (self.command is None):
            raise ValueError(f"phase {self.name!r}: give exactly one of run= or command=")


PHASES: dict[str, Phase] = {}


def register(phase: Phase) -> Phase:
    """Add ``phase`` at the end of the campaign (names are unique)."""
    if phase.name in PHASES:
        raise ValueError(f"phase {phase.name!r} is registered twice")
    PHASES[phase.name] = phase
    return phase


class Context:
    """What a phase's function gets: where to write, how long it has, smoke or not."""

    def __init__(self, out: Path, phase: str, smoke: bool, deadline: float, options: dict):
        self.out, self.phase, self.smoke, self.deadline = out, phase, smoke, deadline
        self.options = options
        self.dir = out / phase
        self.payload: dict = {"phase": phase, "smoke": smoke, "status": "running", "rows": [],
                              "skipped": [], "notes": {}}

    def remaining(self) -> float:
        return self.deadline - time.time()

    def skip(self, case: str, reason: str) -> None:
        self.payload["skipped"].append({"case": case, "reason": reason})
        print(f"[{self.phase}] skipped {case}: {reason}", flush=True)
        self.save()

    def add(self, row: dict) -> None:
        self.payload["rows"].append(row)
        self.save()

    def save(self) -> Path:
        from soda_mega.utils.provenance import write_json

        return write_json(self.out / f"{self.phase}.json", self.payload)

    def result(self, name: str) -> dict | None:
        """Another phase's saved result, or None."""
        path = self.out / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None


def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- (a) env
def copy_bandwidth(dev, nbytes: int, iters: int = 10, warmup: int = 3) -> dict:
    """Device-to-device copy bandwidth, bytes read + written per second (median)."""
    import statistics

    import torch

    src = torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=dev)
    dst = torch.empty_like(src)
    times = []
    for i in range(warmup + iters):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= warmup:
            times.append(seconds)
    if not torch.equal(src[-1024:], dst[-1024:]):
        raise RuntimeError("copy benchmark: destination differs from source")
    med = statistics.median(times)
    moved = 2 * src.numel() * 4
    return {"gb_per_s": moved / med / 1e9, "gb_per_s_max": moved / min(times) / 1e9,
            "bytes_copied": src.numel() * 4, "median_seconds": med, "iters": iters,
            "device": dev.type, "label": f"{dev.type} copy_ of {src.numel() * 4 / 2**20:.0f} MiB, "
                                         "bytes read + written over the median time"}


def phase_env(ctx: Context) -> None:
    import platform

    import torch

    from soda_mega.perf.gemm import matmul_peak
    from soda_mega.training.metrics import peak_tflops

    dev = _torch_device()
    p = ctx.payload
    p["python"] = platform.python_version()
    p["executable"] = sys.executable
    p["commit_note"] = commit_note()
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        p["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                    "multiprocessors": props.multi_processor_count,
                    "memory_gib": props.total_memory / 2**30,
                    "l2_cache_mib": getattr(props, "L2_cache_size", 0) / 2**20,
                    "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
        p["spec_peak_bf16_tflops"] = peak_tflops()
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,"
                                  "clocks.max.sm,clocks.mem,power.limit,temperature.gpu",
                                  "--format=csv"], capture_output=True, text=True, timeout=20)
            p["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            p["nvidia_smi"] = f"not available: {err}"
    ctx.save()
    n, dtype = (8192, torch.bfloat16) if not ctx.smoke else (256, torch.float32)
    p["matmul_peak"] = matmul_peak(dev, dtype, n, iters=20 if dev.type == "cuda" else 5,
                                   warmup=5 if dev.type == "cuda" else 1)
    ctx.save()
    p["copy_bandwidth"] = copy_bandwidth(dev, (2 << 30) if not ctx.smoke else (8 << 20))
    p["status"] = "complete"
    ctx.save()


def commit_note() -> str:
    """The commit of this tree: git when it is there, else what scripts/gpu_wheels.sh wrote."""
    from soda_mega.utils.provenance import git_commit

    commit = git_commit(REPO)
    if commit != "unknown":
        return commit
    stamp = REPO / ".gpu-wheels" / "COMMIT"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


# ----------------------------------------------------------------------------- (b) pytest
def gpu_test_files() -> list[str]:
    """The test files that hold ``gpu``-marked tests, relative to the repository."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


def phase_pytest(ctx: Context) -> None:
    import importlib.util
    import xml.etree.ElementTree as ET

    ctx.dir.mkdir(parents=True, exist_ok=True)
    xml = ctx.dir / "junit.xml"
    targets = ctx.options.get("pytest_paths") or (
        ["tests/training/test_memory_plan.py"] if ctx.smoke else gpu_test_files())
    # Only the files with gpu-marked tests are collected: a module of another test folder
    # that imports something the GPU host lacks must not stop these.
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml}", *targets]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append("--timeout=120")  # one hung test must not take the whole phase
    ctx.payload["command"] = " ".join(cmd[1:])
    ctx.save()
    timeout = max(5.0, ctx.remaining() - 3)
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        output = err.stdout or ""
        rc, output = None, output.decode(errors="replace") if isinstance(output, bytes) else output
        ctx.payload["notes"]["timeout"] = f"pytest stopped after {timeout:.0f} s"
    ctx.payload["returncode"] = rc
    ctx.payload["output_tail"] = output[-3000:]
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if xml.is_file():
        root = ET.parse(xml).getroot()
        for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
            for case in suite.iter("testcase"):
                bad = case.find("failure")
                bad = bad if bad is not None else case.find("error")
                if bad is not None:
                    failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                                   "message": (bad.get("message") or "")[:300]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ctx.payload.update(counts=counts, failed=failed)
    # rc 5: nothing collected (no gpu-marked test in the given paths)
    ctx.payload["status"] = "complete" if rc in (0, 1, 5) else "partial"
    ctx.save()
    if rc not in (0, 5):
        raise SystemExit(f"pytest -m gpu: return code {rc}, {counts['failures']} failed, "
                         f"{counts['errors']} errors")


# ----------------------------------------------------------------------------- (c) kernels
def _bench_kernels():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernels",
                                                  REPO / "benchmarks" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preset_hidden_sizes() -> list[int]:
    from soda_mega.config import load_config

    return sorted({load_config(preset=p).model.hidden_size
                   for p in ("soda-135m", "soda-600m", "soda-1.7b", "soda-4b")})


def kernel_shapes(smoke: bool) -> list[tuple[int, int, int]]:
    """(tokens, hidden, tp) in the order they run: TP=1 before TP=2, small before large."""
    if smoke:
        return [(96, 48, 1), (96, 48, 2)]
    hs = preset_hidden_sizes()
    return [(n, h, tp) for tp in (1, 2) for n in (8192, 16384) for h in hs]


def _modality_pass_row(bk, torch, args, dtype, dev, n: int, h: int) -> dict:
    """torch's embedding plus a separate modality pass (the embedding target's baseline)."""
    import torch.nn.functional as F

    from soda_mega.tokens import VocabLayout

    layout = VocabLayout(text_vocab_size=258, bos_id=256, eos_id=257, codebook_size=16) \
        if args.smoke else VocabLayout.soda_default()
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, layout.size, (n,), generator=g).to(dev)
    weight = torch.nn.Parameter(torch.randn(layout.size, h, generator=g).to(dev, dtype))
    grad = torch.randn(n, h, generator=g).to(dev, dtype)
    holder = {}

    def forward():
        out = F.embedding(ids, weight)
        holder["modality"] = layout.modality(ids)
        return (out * grad).sum()

    m = bk.measure(torch, forward, (weight,), args.iters, args.warmup)
    return {"op": "embedding", "tokens": n, "hidden": h, "vocab_local": layout.size,
            "impl": "torch+modality", **m}


#: the fused kernels: the recompute path, and under the training contract both designs x both
#: GEMM engines and the measured choice among them (issues 22 and 34; bench_kernels'
#: ``TRAIN_DESIGNS``); every other implementation of bench_kernels.py is a baseline
SODA_IMPLS = ("soda_triton", "soda_triton_train", "soda_triton_train_torchgemm",
              "soda_triton_train_recompute", "soda_triton_train_recompute_torchgemm",
              "soda_triton_train_measured")
EMBEDDING_BASELINES = ("reference", "torch", "megatron")


def phase_kernels(ctx: Context, which: str) -> None:
    """``which`` = "baselines" (every implementation but the Triton kernels) or "triton".

    The two run in separate processes: a Triton kernel that has never run on this GPU can
    leave a sticky CUDA error that would void every later measurement of its process.
    """
    import torch

    from soda_mega.config.schema import ParallelConfig
    from soda_mega.parallel import state

    bk = _bench_kernels()
    state.initialize(ParallelConfig(), seed=0)  # Megatron's baselines need the 1-rank TP group
    dev = _torch_device()
    smoke = ctx.smoke
    base = ["--smoke"] if smoke else ["--iters", "5", "--warmup", "2"]
    dtype = torch.float32 if smoke else torch.bfloat16
    if which == "triton":
        loss_names = list(bk.loss_methods(torch, ["torch_compile"])[0]) + ["torch_compile", "liger", "cce"]
        loss_skip = [n for n in loss_names if n not in SODA_IMPLS]
        emb_skip = list(EMBEDDING_BASELINES)
    else:
        # the fp32 reference is minutes at full shapes on a GPU; torch eager is the comparison
        loss_skip = list(SODA_IMPLS) + ([] if smoke else ["reference"])
        emb_skip = list(SODA_IMPLS)
    ctx.payload.update(dtype=str(dtype).replace("torch.", ""), which=which,
                       skipped_impls={"loss": loss_skip, "embedding": emb_skip})
    rates = []  # seconds per (tokens x hidden) of each finished shape; the first holds compiles
    for n, h, tp in kernel_shapes(smoke):
        case = f"loss N={n} H={h} TP={tp}"
        # The fastest rate so far predicts the next shape (compilation inflates the first ones);
        # the parent's hard stop is the backstop for a shape that overruns anyway.
        need = 1.2 * min(rates) * n * h if len(rates) >= 2 else (3 if smoke else 10)
        if need > ctx.remaining():
            ctx.skip(case, f"needs ~{need:.0f} s, {ctx.remaining():.0f} s left")
            continue
        t0 = time.time()
        args = bk.parse_args(base + ["--skip", *loss_skip])
        args.tokens, args.hidden, args.tp = [n], [h], [tp]
        try:
            rows, notes = bk.run_loss(torch, args, dtype, dev)
        except Exception as err:  # noqa: BLE001 - one shape failing must not lose the others
            rows, notes = [{"op": "loss", "tokens": n, "hidden": h, "tp": tp, "impl": "*",
                            "error": f"{type(err).__name__}: {err}"[:400]}], {}
            traceback.print_exc()
        if which == "baselines":  # (the notes say which baselines are not installed)
            ctx.payload["notes"].update(notes)
        for r in rows:
            ctx.payload["rows"].append(r)
        ctx.save()
        rates.append((time.time() - t0) / (n * h))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    seen = set()
    for n, h, _ in kernel_shapes(smoke):
        if (n, h) in seen:
            continue
        seen.add((n, h))
        case = f"embedding N={n} H={h}"
        if ctx.remaining() < (3 if smoke else 8):
            ctx.skip(case, f"{ctx.remaining():.0f} s left")
            continue
        args = bk.parse_args(base + ["--skip", *emb_skip])
        args.tokens, args.hidden = [n], [h]
        try:
            rows, notes = bk.run_embedding(torch, args, dtype, dev)
            if which == "baselines":
                rows.append(_modality_pass_row(bk, torch, args, dtype, dev, n, h))
        except Exception as err:  # noqa: BLE001
            rows, notes = [{"op": "embedding", "tokens": n, "hidden": h, "impl": "*",
                            "error": f"{type(err).__name__}: {err}"[:400]}], {}
            traceback.print_exc()
        if which == "baselines":
            ctx.payload["notes"].update({f"embedding/{k}": v for k, v in notes.items()})
        ctx.payload["rows"] += rows
        ctx.save()
    ctx.payload["status"] = "partial" if ctx.payload["skipped"] else "complete"
    ctx.save()
    state.shutdown()


# ----------------------------------------------------------------------------- (d) throughput
THROUGHPUT_PRESETS = ("soda-135m", "soda-1.7b", "soda-600m", "soda-4b")


def fitting_settings(name: str, args, capacity: float) -> tuple[object, list[str]]:
    """The preset's launcher settings, or the first of smaller micro-batch / more recompute
    whose memory plan fits ``capacity`` bytes; (config, notes)."""
    from soda_mega.perf.throughput import case_config
    from soda_mega.training.plan import GIB, MemoryAssumptions, plan_memory

    cfg, notes = case_config(name, args, 1, [])
    tries = [(None, None), (1, None), (1, "selective"), (1, "full")]
    for mb, rec in tries:
        args.micro_batch, args.recompute = mb, rec
        cfg, notes = case_config(name, args, 1, [])
        plan = plan_memory(cfg, 1, MemoryAssumptions(target="cuda"))
        if plan.device_total <= 0.9 * capacity:
            if mb or rec:
                notes = notes + [f"micro-batch {cfg.training.micro_batch_size}, recompute "
                                 f"{cfg.training.recompute}: the launcher settings do not fit "
                                 f"(plan {plan.device_total / GIB:.1f} GiB)"]
            break
    args.micro_batch = args.recompute = None
    return cfg, notes


def phase_throughput(ctx: Context, variants: tuple[str, ...]) -> None:
    """``Trainer.train_step`` of each preset with the kernel ``variants`` (one process per
    variant group, for the reason :func:`phase_kernels` gives)."""
    import tempfile

    import torch

    from soda_mega.parallel import state
    from soda_mega.perf import harness, throughput
    from soda_mega.perf.gemm import matmul_peak
    from soda_mega.training.metrics import peak_tflops
    from soda_mega.training.plan import plan_memory
    from soda_mega.utils.telemetry import GpuTelemetry

    cuda = torch.cuda.is_available()
    smoke = ctx.smoke
    args = argparse.Namespace(
        smoke=smoke, presets=None, variants=list(variants),
        steps=1 if smoke else 4, warmup=1 if smoke else 2, accum=2 if smoke else 4,
        micro_batch=None, recompute=None, peak_tflops=None, gemm_n=None,
        configs_dir=REPO / "launchers" / "configs", out_dir=None, no_plot=True)
    env = ctx.result("env") or {}
    gemm = env.get("matmul_peak")
    if not gemm:
        gemm = matmul_peak(harness.device(), torch.bfloat16 if cuda else torch.float32,
                           8192 if cuda else 256, iters=10, warmup=3)
        ctx.payload["notes"]["matmul_peak"] = "measured here: the env phase left none"
    spec_peak = peak_tflops() if cuda else None
    ctx.payload.update(matmul_peak=gemm, spec_peak_tflops=spec_peak,
                       settings={k: getattr(args, k) for k in ("steps", "warmup", "accum")})
    state.init_distributed()
    telemetry = GpuTelemetry(interval_s=0.2)
    # smoke: the tiny case only (tests/benchmarks/test_bench_throughput.py runs the others)
    presets = ["tiny"] if smoke else list(THROUGHPUT_PRESETS)
    capacity = torch.cuda.get_device_properties(0).total_memory if cuda else None
    with tempfile.TemporaryDirectory(prefix="soda-campaign-") as tmp_name:
        tmp = Path(tmp_name)
        corpora: dict = {}
        for name in presets:
            if cuda:
                base, notes = fitting_settings(name, args, capacity)
            else:
                base, notes = throughput.case_config(name, args, 1, [])
            key = json.dumps(base.vocab.__dict__, sort_keys=True, default=str)
            for variant in args.variants:
                case = f"{name} {variant}"
                # building the model draws every weight on the host CPU (~0.1 s per 1e7
                # numbers, soda_mega/model/init.py), then warm-up and timed steps
                floor = 5 if smoke else 15 + 12e-9 * plan_memory(base, 1).worst.parameters
                if ctx.remaining() < floor:
                    ctx.skip(case, f"{ctx.remaining():.0f} s left, the case needs ~{floor:.0f} s")
                    continue
                reason = throughput.variant_unavailable(variant)
                if reason:
                    row = throughput.run_case(name, variant, base, notes, args, 1, [], tmp,
                                              telemetry, gemm, spec_peak)
                    ctx.add(row)
                    continue
                if key not in corpora:
                    need = base.training.global_batch_size * (base.model.seq_length + 1) * 4
                    corpora[key] = harness.synthetic_corpus(
                        tmp / f"corpus{len(corpora)}", base,
                        min_tokens=max(need, 20_000 if smoke else 200_000))
                t0 = time.time()
                row = throughput.run_case(name, variant, base, notes, args, 1, corpora[key], tmp,
                                          telemetry, gemm, spec_peak)
                row["case_seconds"] = time.time() - t0
                print(throughput._progress(row), flush=True)
                ctx.add(row)
    telemetry.close()
    ctx.payload["status"] = "partial" if ctx.payload["skipped"] else "complete"
    ctx.save()


# ----------------------------------------------------------------------------- (e) planner
def phase_planner(ctx: Context) -> None:
    """The memory plan against ``max_memory_allocated`` for every run of the throughput phase."""
    results = [r for r in (ctx.result("throughput"), ctx.result("throughput_triton")) if r]
    if not results:
        ctx.payload["status"] = "complete"
        ctx.payload["notes"]["throughput"] = "no throughput result: nothing to compare"
        ctx.save()
        return
    for r in (row for res in results for row in res["rows"]):
        mem = r.get("memory") or {}
        pred, meas = mem.get("predicted_allocated_gib"), mem.get("measured_peak_allocated_gib")
        row = {"case": r["case"], "variant": r["variant"], "status": r["status"],
               "settings": r.get("settings"), "predicted_allocated_gib": pred,
               "measured_peak_allocated_gib": meas}
        if pred is not None and meas:
            row["predicted_over_measured"] = pred / meas
            row["within_10pct"] = abs(pred / meas - 1) <= 0.10
        else:
            row["reason"] = r.get("reason") or "no measured peak (CPU: the planner's CUDA peak " \
                                               "is compared on a GPU only)"
        ctx.payload["rows"].append(row)
    ctx.payload["status"] = "complete"
    ctx.save()


# ----------------------------------------------------------------------------- (e2) plan layouts
#: the preset and the (micro-batch, recompute) layouts timed on the lent GPU (one GPU: no
#: TP / PP / DP to vary), in order of importance: later ones are skipped when time runs short
PLAN_PRESET, PLAN_LAYOUTS = "soda-135m", ((1, "none"), (1, "full"), (2, "none"))
SMOKE_PLAN_LAYOUTS = ((2, "none"), (2, "full"))


def phase_plan_layouts(ctx: Context) -> None:
    """A few layouts of one preset timed on this GPU with the step-time model's prediction
    beside each (issue 36): ``soda_mega.planning`` with its assumed constants, for the GPU
    kind this device is. On a CPU (smoke) the prediction is for an H100 SXM and is not
    compared with anything."""
    import tempfile

    import torch

    from soda_mega.parallel import state
    from soda_mega.perf import harness, throughput
    from soda_mega.planning import calibrate
    from soda_mega.planning.hardware import GPUS, gpu_spec
    from soda_mega.planning.search import stack_of
    from soda_mega.planning.shapes import layout_of, shape_of
    from soda_mega.planning.steptime import step_time
    from soda_mega.training.metrics import peak_tflops
    from soda_mega.utils.telemetry import GpuTelemetry

    cuda, smoke = torch.cuda.is_available(), ctx.smoke
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    kind = calibrate.device_kind(device) if cuda else None
    gpu = next((g for g in GPUS.values() if kind and g.name.startswith(kind)), None)
    comparable = gpu is not None
    gpu = gpu or gpu_spec("h100-sxm")
    cal = calibrate.calibration_for(gpu, None)  # assumed constants: the model as shipped
    args = argparse.Namespace(
        smoke=smoke, presets=None, variants=["megatron"], steps=1 if smoke else 3,
        warmup=1 if smoke else 2, accum=2 if smoke else 4, micro_batch=None, recompute=None,
        peak_tflops=None, gemm_n=None, configs_dir=REPO / "launchers" / "configs", out_dir=None,
        no_plot=True)
    name = "tiny" if smoke else PLAN_PRESET
    gemm = (ctx.result("env") or {}).get("matmul_peak") or {"tflops": float("nan")}
    ctx.payload.update(preset=name, device=device, predicted_for=gpu.name, comparable=comparable,
                       constants="assumed (soda_mega/planning/constants.py, hardware.py)")
    state.init_distributed()
    telemetry = GpuTelemetry(interval_s=0.2)
    with tempfile.TemporaryDirectory(prefix="soda-campaign-plan-") as tmp_name:
        tmp, corpus = Path(tmp_name), None
        for mb, rec in (SMOKE_PLAN_LAYOUTS if smoke else PLAN_LAYOUTS):
            case = f"{name} micro-batch {mb} recompute {rec}"
            if ctx.remaining() < (5 if smoke else 20):
                ctx.skip(case, f"{ctx.remaining():.0f} s left")
                continue
            args.micro_batch, args.recompute = mb, rec
            base, notes = throughput.case_config(name, args, 1, [])
            spec = throughput.VARIANTS["megatron"]
            planned = harness.with_overrides(base, [f"--kernels.loss={spec['loss']}"])
            pred = step_time(shape_of(planned), layout_of(planned, 1), gpu, stack_of(planned), cal.eff)
            if corpus is None:
                need = base.training.global_batch_size * (base.model.seq_length + 1) * 4
                corpus = harness.synthetic_corpus(tmp / "corpus", base, min_tokens=max(
                    need, 20_000 if smoke else 200_000))
            row = throughput.run_case(name, "megatron", base, notes, args, 1, corpus, tmp,
                                      telemetry, gemm, peak_tflops() if cuda else None)
            row.update(layout={"micro_batch": mb, "recompute": rec},
                       predicted_step_s=pred.seconds, predicted_parts_s=pred.parts)
            measured = row.get("step_seconds_median")
            if comparable and measured:
                row["predicted_over_measured"] = pred.seconds / measured
            print(f"[plan_layouts] {case}: measured "
                  f"{'-' if not measured else f'{measured:.4g} s'}, predicted {pred.seconds:.4g} s "
                  f"for {gpu.name}" + ("" if comparable else " (not comparable: no such GPU here)"),
                  flush=True)
            ctx.add(row)
    telemetry.close()
    ctx.payload["status"] = "partial" if ctx.payload["skipped"] else "complete"
    ctx.save()


# ----------------------------------------------------------------------------- (f) profile
def phase_profile(ctx: Context) -> None:
    import gzip
    import shutil
    import tempfile

    import torch

    from soda_mega.config import load_config
    from soda_mega.parallel import state
    from soda_mega.perf import harness
    from soda_mega.perf.profiling import breakdown, record_trace
    from soda_mega.perf.throughput import SMOKE_CASES

    cuda = torch.cuda.is_available()
    state.init_distributed()
    if ctx.smoke:
        preset, overrides = SMOKE_CASES["tiny"]
        cfg = load_config(preset=preset, overrides=overrides)
        name = "tiny"
    else:
        name = "soda-1.7b"
        cfg = load_config(REPO / "launchers" / "configs" / "soda-1.7b.yaml")
    cfg = harness.with_overrides(cfg, [f"--training.global_batch_size={cfg.training.micro_batch_size * 2}",
                                       "--kernels.loss=triton" if cuda else "--kernels.loss=torch",
                                       "--kernels.embedding=triton" if cuda else "--kernels.embedding=torch"])
    ctx.payload.update(case=name, settings={"micro_batch_size": cfg.training.micro_batch_size,
                                            "micro_batches_per_step": 2, "steps": 2, "warmup": 1,
                                            "seq_length": cfg.model.seq_length,
                                            "kernels": dataclasses.asdict(cfg.kernels)})
    ctx.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="soda-campaign-profile-") as tmp_name:
        tmp = Path(tmp_name)
        data = harness.synthetic_corpus(tmp / "corpus", cfg, min_tokens=max(
            20_000 if ctx.smoke else 200_000,
            4 * cfg.training.global_batch_size * (cfg.model.seq_length + 1)))
        cfg = harness.measurement_config(cfg, tmp / "run", data)
        trainer = harness.build_trainer(cfg)
        try:
            batches = harness.fetch_steps(trainer, 3)
            trace = record_trace(trainer, batches, 2, 1, tmp / "trace.json")
        finally:
            harness.release(trainer)
        result = breakdown(trace)
        with open(trace, "rb") as src, gzip.open(ctx.dir / "trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    result["trace"] = f"{ctx.phase}/trace.json.gz"
    ctx.payload["breakdown"] = result
    ctx.payload["status"] = "complete"
    ctx.save()


# ----------------------------------------------------------------------------- (g) newest mcore
PROBE_CASE = ["--kernels.loss=megatron", "--kernels.embedding=megatron",  # megatron-core is probed
              "--model.hidden_size=256", "--model.num_layers=2", "--model.num_attention_heads=4",
              "--model.num_kv_heads=2", "--model.head_dim=64", "--model.ffn_hidden_size=768",
              "--model.seq_length=256", "--training.micro_batch_size=2",
              "--training.global_batch_size=2"]


def probe_megatron(out: Path) -> int:
    """Child of the megatron_newest phase: import megatron-core, train one step, write JSON."""
    import importlib.metadata
    import tempfile

    import torch

    record = {"megatron_core_version": None, "megatron_core_path": None}
    try:
        import megatron.core

        record["megatron_core_version"] = importlib.metadata.version("megatron-core")
        record["megatron_core_path"] = str(Path(megatron.core.__file__).parent)
        from soda_mega.config import load_config
        from soda_mega.parallel import state
        from soda_mega.perf import harness

        state.init_distributed()
        cfg = load_config(preset="soda-135m", overrides=PROBE_CASE + (
            [] if torch.cuda.is_available() else ["--training.precision=fp32",
                                                  "--model.seq_length=64"]))
        with tempfile.TemporaryDirectory(prefix="soda-mcore-probe-") as tmp_name:
            tmp = Path(tmp_name)
            data = harness.synthetic_corpus(tmp / "corpus", cfg, min_tokens=50_000)
            cfg = harness.measurement_config(cfg, tmp / "run", data)
            trainer = harness.build_trainer(cfg)
            try:
                rec = harness.run_steps(trainer, harness.fetch_steps(trainer, 1), 1)[0]
            finally:
                harness.release(trainer)
        record.update(imports=True, trained_one_step=bool(torch.isfinite(torch.tensor(rec["loss"]))),
                      loss=rec["loss"], step_seconds=rec["step_seconds"])
        rc = 0
    except Exception as err:  # noqa: BLE001 - the failure is the finding
        record.update(error=f"{type(err).__name__}: {err}"[:1000],
                      traceback=traceback.format_exc()[-3000:])
        rc = 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(record, indent=1))
    return rc


def phase_megatron_newest(ctx: Context) -> None:
    """Information, not a gate: the newest megatron-core in a scratch dir, one training step."""
    import importlib.metadata

    wheels_dir = ctx.options.get("newest_wheels")
    wheels = sorted(Path(wheels_dir).glob("megatron_core-*.whl")) if wheels_dir else []
    ctx.dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    p = ctx.payload
    p["pinned_megatron_core"] = importlib.metadata.version("megatron-core")
    if wheels:
        site = Path(ctx.options.get("scratch") or "/tmp/soda-mcore-newest")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), str(wheels[-1])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5, ctx.remaining() - 5))
        p["install"] = {"wheel": wheels[-1].name, "returncode": proc.returncode,
                        "output_tail": (proc.stdout + proc.stderr)[-1500:]}
        if proc.returncode != 0:
            p["status"] = "complete"
            p["finding"] = "the newest megatron-core wheel did not install"
            ctx.save()
            return
        env["PYTHONPATH"] = os.pathsep.join([str(site)] + [x for x in env.get("PYTHONPATH", "").split(
            os.pathsep) if x])
    else:
        where = f"in {wheels_dir}" if wheels_dir else "given (--newest-wheels)"
        p["notes"]["wheel"] = (f"no megatron_core-*.whl {where}: probing the installed "
                               "megatron-core instead (the code path, not the newest release)")
    ctx.save()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-megatron", "--out", str(ctx.dir)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(5, ctx.remaining() - 2))
        p["probe_returncode"] = proc.returncode
        p["probe_output_tail"] = (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        p["probe_returncode"] = None
        p["notes"]["timeout"] = "the probe ran out of time"
    probe = ctx.dir / "probe.json"
    if probe.is_file():
        p["probe"] = json.loads(probe.read_text())
    p["status"] = "complete"
    ctx.save()


# ----------------------------------------------------------------------------- the phases
register(Phase("env", 25, 150, "GPU, driver, versions; matmul peak; copy bandwidth", run=phase_env))
register(Phase("pytest", 55, 150, "pytest -m gpu", run=phase_pytest))
register(Phase("kernels", 95, 150, "loss and embedding baselines at SODA shapes (torch, "
               "torch.compile, Megatron, Liger, CCE)", run=functools.partial(phase_kernels, which="baselines")))
register(Phase("kernels_triton", 80, 150, "the fused Triton loss and embedding at the same shapes",
               run=functools.partial(phase_kernels, which="triton")))
register(Phase("throughput", 85, 150, "Trainer.train_step per preset, megatron kernels: MFU",
               run=functools.partial(phase_throughput, variants=("megatron",))))
register(Phase("throughput_triton", 85, 150, "Trainer.train_step per preset, triton kernels: MFU",
               run=functools.partial(phase_throughput, variants=("triton",))))
register(Phase("planner", 10, 60, "memory plan vs max_memory_allocated", run=phase_planner))
register(Phase("profile", 50, 150, "torch.profiler breakdown of soda-1.7b", run=phase_profile))
register(Phase("codec", 40, 120, "Mimi codec throughput (data build; target >= 2,000 s of audio/s per GPU)",
               command=("{python}", "benchmarks/bench_codec.py", "--out-dir", "{phase_dir}",
                        "--budget-s", "30"),
               smoke_args=("--smoke",)))
register(Phase("checkpoint", 20, 90, "checkpoint save stall of soda-135m, sync vs async (issue 31 target: "
               "async stall <= 10% of the sync save)",
               command=("{python}", "benchmarks/bench_checkpoint.py", "--out", "{phase_dir}",
                        "--saves", "1"),
               smoke_args=("--smoke",)))
register(Phase("megatron_newest", 20, 150, "newest megatron-core: import + one step (information)",
               run=phase_megatron_newest))
register(Phase("plan_layouts", 45, 90, "a few layouts of soda-135m timed, the step-time model's "
               "prediction beside each (issue 36)", run=phase_plan_layouts))


# ----------------------------------------------------------------------------- parent
def _child_env() -> dict:
    import torch

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():
        # NOTE: read by Triton when it is first imported; no child imports it before this.
        env.setdefault("TRITON_INTERPRET", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    return env


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_phase(phase: Phase, out: Path, smoke: bool, timeout: float, options: dict) -> dict:
    """Run one phase in a child process; its record for campaign.json."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{phase.name}.log"
    started = time.time()
    if phase.command is not None:
        (out / phase.name).mkdir(parents=True, exist_ok=True)
        fill = {"python": sys.executable, "out": str(out), "phase_dir": str(out / phase.name)}
        cmd = [_fill(part, fill) for part in phase.command] + (list(phase.smoke_args) if smoke else [])
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase.name, "--out", str(out),
               "--deadline", f"{started + max(1.0, timeout - min(10.0, 0.1 * timeout)):.3f}",
               "--options", json.dumps(options)] + (["--smoke"] if smoke else [])
    record = {"name": phase.name, "help": phase.help, "budget_s": timeout, "command": cmd[1:] if
              phase.run else cmd, "log": f"logs/{phase.name}.log"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=_child_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = None
    record["seconds"] = time.time() - started
    record["returncode"] = rc
    if phase.command is not None:
        collect_command_results(out, phase.name, rc)
    result_path = out / f"{phase.name}.json"
    inner = json.loads(result_path.read_text()).get("status") if result_path.is_file() else None
    if rc is None:
        record["status"] = "timeout"
        record["reason"] = f"stopped after {timeout:.0f} s (its results so far are kept)"
    elif rc != 0:
        record["status"] = "error"
        record["reason"] = _tail(log_path, 1200)
    else:
        record["status"] = "partial" if inner == "partial" else "ok"
    if inner == "partial" and rc == 0:
        record["reason"] = "some cases were skipped for time (listed in the phase's result)"
    return record


def _fill(part: str, values: dict) -> str:
    """``{python}``, ``{out}``, ``{phase_dir}`` replaced; other braces left alone."""
    for key, value in values.items():
        part = part.replace("{" + key + "}", value)
    return part


def collect_command_results(out: Path, name: str, rc: int | None) -> None:
    """``<name>.json`` for a command phase: what it wrote into its folder, its JSON and markdown
    results inlined (so the summary and the converted results carry them)."""
    from soda_mega.utils.provenance import write_json

    folder = out / name
    payload = {"phase": name, "status": "complete" if rc == 0 else "error", "returncode": rc,
               "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
               "results": {}, "markdown": {}}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.stat().st_size > 256_000:
            continue
        rel = str(path.relative_to(folder))
        try:
            if path.suffix == ".json":
                payload["results"][rel] = json.loads(path.read_text())
            elif path.suffix == ".md":
                payload["markdown"][rel] = path.read_text()
        except (OSError, ValueError) as err:
            payload["results"][rel] = f"unreadable: {err}"
    write_json(out / f"{name}.json", payload)


def _tail(path: Path, n: int) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def bundle(out: Path, target: Path) -> list[str]:
    """Pack ``out`` into the tar.gz ``target`` (atomically); the files left out for size."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    left_out = []
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if not path.is_file() or path.name.endswith(".tmp"):
                continue
            if path.stat().st_size > BUNDLE_FILE_LIMIT:
                left_out.append(f"{path.relative_to(out)} ({path.stat().st_size >> 20} MiB)")
                continue
            tar.add(path, arcname=f"{out.name}/{path.relative_to(out)}")
    os.replace(tmp, target)
    return left_out


def campaign(args) -> int:
    from soda_mega.perf import campaign_report

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = args.phases or list(PHASES)
    unknown = [n for n in names + (args.skip or []) if n not in PHASES]
    if unknown:
        print(f"gpu_campaign: unknown phase(s) {unknown}; known: {list(PHASES)}", file=sys.stderr)
        return 2
    names = [n for n in names if n not in (args.skip or [])]
    total = args.total_s or (SMOKE_TOTAL_S if args.smoke else TOTAL_S)
    start = time.time()
    end = start + total
    options = {"newest_wheels": args.newest_wheels, "pytest_paths": args.pytest_paths}
    state = {"campaign": "gpu", "smoke": bool(args.smoke), "started_utc": _utc(start),
             "total_budget_s": total, "phases": [], "commit": commit_note()}
    banked = 0.0
    for name in names:
        phase = PHASES[name]
        budget = phase.smoke_budget_s if args.smoke else phase.budget_s
        left = end - time.time()
        if left < 3:
            state["phases"].append({"name": name, "help": phase.help, "status": "skipped",
                                    "reason": f"the campaign's {total:.0f} s were used up"})
            continue
        timeout = min(budget + banked, left)
        print(f"[campaign] {name}: up to {timeout:.0f} s ({phase.help})", flush=True)
        record = run_phase(phase, out, args.smoke, timeout, options)
        banked = max(0.0, budget + banked - record["seconds"])
        state["phases"].append(record)
        print(f"[campaign] {name}: {record['status']} in {record['seconds']:.1f} s"
              + (f" ({record.get('reason', '')[-300:].strip()})" if record["status"] != "ok" else ""),
              flush=True)
        _write_state(out, state, args.bundle, start)
    state["finished_utc"] = _utc(time.time())
    _write_state(out, state, args.bundle, start)
    print(campaign_report.targets_text(campaign_report.load(out)), flush=True)
    print(f"[campaign] wrote {out}" + (f" and {args.bundle}" if args.bundle else ""), flush=True)
    return 0 if all(p["status"] in ("ok", "partial") for p in state["phases"]) else 1


def _utc(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def _write_state(out: Path, state: dict, bundle_path: str | None, start: float) -> None:
    from soda_mega.perf import campaign_report

    state["elapsed_s"] = time.time() - start
    write_atomic(out / "campaign.json", json.dumps(state, indent=1))
    try:
        write_atomic(out / "summary.md", campaign_report.markdown(campaign_report.load(out)))
    except Exception as err:  # noqa: BLE001 - a report bug must not stop the measurements
        write_atomic(out / "summary.md", f"# campaign summary failed\n\n{type(err).__name__}: {err}\n"
                                         f"\n```\n{traceback.format_exc()}\n```\n")
    if bundle_path:
        left_out = bundle(out, Path(bundle_path))
        if left_out:
            state["bundle_left_out"] = left_out
            write_atomic(out / "campaign.json", json.dumps(state, indent=1))
        summary = Path(bundle_path).with_name("summary.md")
        write_atomic(summary, (out / "summary.md").read_text())


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Phases: " + "; ".join(f"{n}: {ph.help}" for n, ph in PHASES.items()))
    p.add_argument("--out", required=True, help="output folder (created; phases write into it)")
    p.add_argument("--smoke", action="store_true",
                   help="every phase at tiny shapes on CPU (Triton interpreter): shows that the "
                        "campaign works, measures nothing about a GPU")
    p.add_argument("--bundle", help="after every phase, pack --out into this .tar.gz and copy "
                                    "summary.md beside it (for the device tool's $OUT)")
    p.add_argument("--phases", nargs="+", metavar="NAME", help="run only these phases, in this order")
    p.add_argument("--skip", nargs="+", metavar="NAME", help="leave these phases out")
    p.add_argument("--total-s", type=float,
                   help=f"time for the whole campaign (default {TOTAL_S:.0f}; smoke {SMOKE_TOTAL_S:.0f})")
    p.add_argument("--newest-wheels", help="folder with the newest megatron_core-*.whl for the "
                                           "megatron_newest phase (scripts/gpu_wheels.sh fills it)")
    p.add_argument("--pytest-paths", nargs="+", metavar="PATH",
                   help="what the pytest phase runs (default: tests; smoke: the memory-plan tests)")
    # internal: one phase in a child process
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--probe-megatron", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args) -> int:
    """One phase in this process (called by :func:`run_phase`)."""
    ctx = Context(Path(args.out), args.phase, args.smoke, args.deadline or time.time() + 3600,
                  json.loads(args.options))
    try:
        PHASES[args.phase].run(ctx)
    except SystemExit:
        raise
    except BaseException as err:
        ctx.payload["status"] = "error"
        ctx.payload["error"] = f"{type(err).__name__}: {err}"[:2000]
        ctx.payload["traceback"] = traceback.format_exc()[-4000:]
        ctx.save()
        raise
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe_megatron:
        # NOTE: before anything of soda_mega: the probe imports the newest megatron-core first
        return probe_megatron(Path(args.out))
    from soda_mega.utils.startup import import_torch_frozen

    import_torch_frozen()  # this process's start (the parent or one phase)
    if args.phase:
        # children inherit TRITON_INTERPRET from the parent (see _child_env)
        return child(args)
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_campaign: no CUDA GPU here: only --smoke runs on a CPU", file=sys.stderr)
        return 2
    return campaign(args)


if __name__ == "__main__":
    sys.exit(main())
