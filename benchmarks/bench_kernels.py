"""Fused linear cross-entropy and interleaved embedding vs. their baselines (issue 4, item 6).

For each shape, every implementation runs in this process on the same inputs; the script
records forward, backward and forward+backward time (median over ``--iters``) and, on CUDA,
the peak memory above the inputs, checks each loss against the plain-PyTorch reference the
tests use, and reports time ratios against the Triton kernel.

Loss implementations: ``reference`` (fp32 materialised logits, the tests' oracle path),
``torch_eager`` (logits + ``F.cross_entropy``), ``torch_compile`` (the same, compiled),
``megatron`` (logits + Megatron-core ``vocab_parallel_cross_entropy``), ``liger`` and ``cce``
(Liger-Kernel / cut-cross-entropy, when installed; never installed by this script),
``soda_torch`` (chunked PyTorch) and ``soda_triton`` (the recompute path: 4 matmuls), and
``soda_torch_train`` / ``soda_triton_train`` (the training path of ``soda_kernels.flce_train``:
the downstream gradient announced, gradients in the forward, 3 matmuls; bf16 adds into an fp32
``main_grad`` as under Megatron DDP). Under the same training contract the other design and the
other GEMM engine (``TRAIN_DESIGNS``): ``soda_triton_train_torchgemm`` (3 matmuls on cuBLAS
through torch), ``soda_triton_train_recompute[_torchgemm]`` (4 matmuls), and
``soda_triton_train_measured`` (``loss_plan=measure``: each candidate timed on this device,
the winner run; its row carries every candidate's time, the choice and the roofline's
prediction). Embedding: ``reference``, ``torch``
(``F.embedding``), ``megatron`` (``VocabParallelEmbedding``), ``soda_triton``. All losses are
computed without z-loss, which not every baseline supports.

Shapes (SODA, issue 4): N in {8192, 16384} tokens, H in {512, 1024, 2048, 2560}, V = 144,644
and the TP=2 / TP=4 shards of the padded vocabulary (rank 0: all rows real).

The same run records, per loss shape, the fused designs' FLOPs and DRAM bytes per
micro-batch next to the ``6 N H V`` ideal (``loss_cost`` rows: the recompute path, 1.33x;
``loss_cost_train`` rows: the training path, 1.00x), and one peak-memory
comparison (``loss_memory`` row, ``--memory-shape``, default N=2048, H=512, V=144,644): the
fused loss vs materialised logits vs the logits-free minimum (weights + their gradient +
hidden + its gradient + one vocabulary slice), as ratios. On CPU the peaks come from torch's
CPU allocator events (``torch.profiler``), on CUDA from ``max_memory_allocated``.

    python benchmarks/bench_kernels.py                # GPU, full grid, bf16
    python benchmarks/bench_kernels.py                # CPU: the cost model, the memory row and
                                                      # fp32 loss timings at --cpu-shape
    python benchmarks/bench_kernels.py --smoke        # ~1-2 min on CPU (Triton interpreter)

Without a GPU (and without ``--smoke``) the run is the CPU measure of issue 22: the cost
model's "x ideal FLOPs" of both designs, the memory row, and one fp32 forward + backward at
``--cpu-shape`` (default N=2048, H=512, V=144,644) of materialised logits
(``F.cross_entropy``), Megatron's ``vocab_parallel_cross_entropy``, ``soda_torch`` and
``soda_torch_train`` in this process on the same inputs (``loss_cpu`` rows, with each time
over the materialised path's), and the GEMM-engine table at ``--engine-shape`` (default N=128,
H=64, V=1,024; ``loss_engine_cpu`` rows): the Triton loss in the interpreter in both designs
x both GEMM engines side by side, and the measured choice among them.

Writes ``bench_kernels_<device>[_smoke].json`` (stamped with device, driver, versions and
commit), a markdown table and, if matplotlib is importable, a plot into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SODA_VOCAB = 144_644


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Targets (H100): loss fwd+bwd >= 2x torch_eager and >= 1.3x "
                                       "the best of liger/cce; embedding bwd >= 2x torch.")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, 1 iteration, CPU-friendly (sets TRITON_INTERPRET=1 without CUDA)")
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384], help="N values")
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 1024, 2048, 2560], help="H values")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4],
                   help="vocabulary shards: TP sizes whose rank-0 shard is benchmarked")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--iters", type=int, help="timed repetitions, median reported (default 10; "
                                              "CPU measure 3)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 3; CPU measure 1)")
    p.add_argument("--cpu-shape", type=int, nargs=3, metavar=("N", "H", "V"),
                   default=[2048, 512, SODA_VOCAB],
                   help="shape of the CPU measure (no GPU, no --smoke): fp32 loss timings")
    p.add_argument("--engine-shape", type=int, nargs=3, metavar=("N", "H", "V"),
                   default=[128, 64, 1024],
                   help="shape of the CPU measure's GEMM-engine table (Triton interpreter, fp32): "
                        "both designs x both GEMM engines and the measured choice")
    p.add_argument("--only", choices=["loss", "embedding", "memory"],
                   help="run one of the benchmarks (loss timing, embedding timing, loss memory)")
    p.add_argument("--memory-shape", type=int, nargs=3, metavar=("N", "H", "V"),
                   default=[2048, 512, SODA_VOCAB],
                   help="shape of the loss peak-memory comparison (fused vs materialised logits "
                        "vs the logits-free minimum); fp32 on CPU, --dtype on GPU")
    p.add_argument("--skip-memory", action="store_true",
                   help="leave out the loss peak-memory comparison (20-60 s on CPU)")
    p.add_argument("--skip", nargs="*", default=[], help="implementations to leave out")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.tp, args.iters, args.warmup = [96], [48], [1, 2], 1, 0
        args.dtype = "fp32"
    cpu = not args.smoke and not _cuda_available()
    args.iters = args.iters if args.iters is not None else (3 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- timing
def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(torch, forward, backward_input, iters: int, warmup: int) -> dict:
    """Median fwd / bwd / fwd+bwd seconds of ``forward()`` -> scalar, and CUDA peak bytes."""
    cuda = torch.cuda.is_available()
    times = {"fwd": [], "bwd": [], "fwd_bwd": []}
    peak = None
    for i in range(warmup + iters):
        for t in backward_input:
            t.grad = None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _sync(torch)
        t0 = time.perf_counter()
        loss = forward()
        _sync(torch)
        t1 = time.perf_counter()
        loss.backward()
        _sync(torch)
        t2 = time.perf_counter()
        if i >= warmup:
            times["fwd"].append(t1 - t0)
            times["bwd"].append(t2 - t1)
            times["fwd_bwd"].append(t2 - t0)
            if cuda:
                peak = max(peak or 0, torch.cuda.max_memory_allocated() - base)
        value = float(loss.detach())
        del loss
    out = {k: statistics.median(v) for k, v in times.items()}
    out["peak_bytes"] = peak
    out["value"] = value
    return out


# ----------------------------------------------------------------------------- loss methods
def loss_methods(torch, skip):
    import torch.nn.functional as F

    from soda_kernels.fused_linear_cross_entropy import (
        fused_linear_cross_entropy,
        fused_linear_cross_entropy_reference,
    )

    def eager(h, w, y):
        return F.cross_entropy((h @ w.t()).float(), y, reduction="sum")

    def train(impl, plan="three_matmul", engine="auto"):
        def fn(h, w, y):
            ones = torch.ones(h.shape[0], device=h.device)
            return fused_linear_cross_entropy(h, with_main_grad(torch, w), y, impl=impl,
                                              known_grad=ones, loss_plan=plan,
                                              gemm_engine=engine).loss.sum()
        return fn

    methods = {
        "reference": lambda h, w, y: fused_linear_cross_entropy_reference(h, w, y).loss.sum(),
        "torch_eager": eager,
        "soda_torch": lambda h, w, y: fused_linear_cross_entropy(
            h, w, y, impl="torch", fuse_main_grad=False).loss.sum(),
        "soda_triton": lambda h, w, y: fused_linear_cross_entropy(
            h, w, y, impl="triton", fuse_main_grad=False).loss.sum(),
        "soda_torch_train": train("torch"),
        **train_design_methods(train),
    }
    notes = {}
    try:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        methods["megatron"] = lambda h, w, y: vocab_parallel_cross_entropy(
            (h @ w.t())[:, None, :], y[:, None]).sum()
    except ImportError as err:
        notes["megatron"] = f"not importable: {err}"
    if "torch_compile" not in skip:
        if torch.cuda.is_available():
            methods["torch_compile"] = torch.compile(eager)
        else:
            notes["torch_compile"] = "skipped on CPU (inductor's C++ build takes minutes; run on GPU)"
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(h, w, y):
            out = liger_fused_linear_cross_entropy(h, w, y, reduction="sum")
            return out[0] if isinstance(out, tuple) else out  # newer versions add z-loss

        methods["liger"] = liger
    except ImportError:
        notes["liger"] = "liger-kernel not installed"
    try:
        from cut_cross_entropy import linear_cross_entropy

        methods["cce"] = lambda h, w, y: linear_cross_entropy(h, w, y, reduction="sum")
    except ImportError:
        notes["cce"] = "cut-cross-entropy not installed"
    for name in skip:
        methods.pop(name, None)
    return methods, notes


#: The training contract (downstream gradient known, grad_W into fp32 main_grad for 16-bit
#: weights) in both designs x both GEMM engines (soda_kernels.gemm_engine), and the measured
#: choice among them (soda_kernels.flce_measure): impl name -> (loss_plan, gemm_engine).
TRAIN_DESIGNS = {
    "soda_triton_train": ("three_matmul", "triton"),
    "soda_triton_train_torchgemm": ("three_matmul", "torch"),
    "soda_triton_train_recompute": ("recompute", "triton"),
    "soda_triton_train_recompute_torchgemm": ("recompute", "torch"),
    "soda_triton_train_measured": ("measure", "auto"),
}


def train_design_methods(train) -> dict:
    return {name: train("triton", plan, engine) for name, (plan, engine) in TRAIN_DESIGNS.items()}


def measured_choice(torch, fn, hidden, weight, labels) -> dict:
    """Run ``fn`` (the ``soda_triton_train_measured`` method) once with a fresh, empty plan
    cache, so it measures every candidate here; returns the decision (times per candidate,
    the choice, the roofline's prediction) for the row."""
    import tempfile

    from soda_kernels import flce_measure

    with tempfile.TemporaryDirectory(prefix="soda-plan-cache-") as cache:
        old = os.environ.get("SODA_KERNELS_CACHE")
        os.environ["SODA_KERNELS_CACHE"] = cache
        flce_measure.forget()
        try:
            before = len(flce_measure.DECISIONS)
            fn(hidden, weight, labels).backward()
            hidden.grad = weight.grad = None
            new = flce_measure.DECISIONS[before:]
        finally:
            if old is None:
                os.environ.pop("SODA_KERNELS_CACHE", None)
            else:
                os.environ["SODA_KERNELS_CACHE"] = old
    if not new:
        return {"choice": None}
    d = new[-1]
    return {"choice": "/".join(d.choice), "candidates_s": d.times_s, "prior": d.prior,
            "choice_line": d.line()}


def with_main_grad(torch, weight):
    """``weight`` as Megatron DDP leaves it, for the training path in 16 bits: an fp32
    ``main_grad`` (made once) that the loss adds its gradient into. fp32 weights stay plain
    (their fp32 gradient accumulates the row chunks)."""
    if weight.dtype != torch.float32 and isinstance(weight, torch.nn.Parameter):
        if getattr(weight, "main_grad", None) is None:
            weight.main_grad = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        weight.grad_added_to_main_grad = False
    return weight


def run_loss(torch, args, dtype, device) -> tuple[list[dict], dict]:
    from soda_kernels.fused_linear_cross_entropy import backward_extra_bytes, default_vocab_slice
    from soda_mega.tokens import VocabLayout

    methods, notes = loss_methods(torch, args.skip)
    rows = []
    vocab = 190 if args.smoke else SODA_VOCAB
    layout_pad = VocabLayout.soda_default()
    for tp in args.tp:
        if args.smoke:
            v_local = -(-vocab // tp)
        elif tp == 1:
            v_local = vocab
        else:
            v_local = layout_pad.padded_size(tp, 128) // tp
        for n in args.tokens:
            for h in args.hidden:
                # Drawn where they are used: on a GPU, host-side draws of the SODA shapes
                # (~3.6e9 numbers per grid) would take minutes of a short GPU window.
                g = torch.Generator(device=device).manual_seed(0)
                hidden = torch.randn(n, h, generator=g, device=device).to(dtype).requires_grad_()
                weight = torch.nn.Parameter(
                    (torch.randn(v_local, h, generator=g, device=device) / h ** 0.5).to(dtype))
                labels = torch.randint(0, v_local, (n,), generator=g, device=device)
                shape = {"tokens": n, "hidden": h, "vocab_local": v_local, "tp": tp}
                ref_value = None
                for name, fn in methods.items():
                    try:
                        extra = (measured_choice(torch, fn, hidden, weight, labels)
                                 if name == "soda_triton_train_measured" else {})
                        m = measure(torch, functools.partial(fn, hidden, weight, labels), (hidden, weight),
                                    args.iters, args.warmup)
                        m.update(extra)
                    except Exception as err:  # noqa: BLE001 - a failing baseline is recorded, not fatal
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        rows.append({"op": "loss", **shape, "impl": name,
                                     "error": f"{type(err).__name__}: {err}"[:300]})
                        continue
                    if name == "reference":
                        ref_value = m["value"]
                    m["loss_rel_diff_vs_reference"] = (
                        None if ref_value is None else abs(m["value"] - ref_value) / abs(ref_value))
                    rows.append({"op": "loss", **shape, "impl": name, **m})
                # Peak is measured above the inputs (weights, hidden) already allocated, so the
                # budget is: the two gradients + the backward's stated temporaries (compacted
                # rows, fp32 grad_h accumulator, one dlogits slice).
                elt = torch.finfo(dtype).bits // 8
                cols = default_vocab_slice(h, v_local, device)
                budget = (v_local + n) * h * elt + backward_extra_bytes(n, h, cols, dtype, "triton")
                rows.append({"op": "loss_memory_budget", **shape, "budget_above_inputs_bytes": budget})
                del hidden, weight, labels
    return rows, notes


def cost_rows(torch, args) -> list[dict]:
    """FLOPs and DRAM bytes per micro-batch of the fused loss (all tokens active), next to the
    ``6 N H V`` ideal, for the benchmark's shapes (``--smoke``: the SODA grid in bf16), with
    the GPU's vocabulary slice and with the gradient added into an fp32 ``main_grad``."""
    from soda_kernels.flce_plan import plan_for_peak, train_cost_model
    from soda_kernels.flce_roofline import PEAKS
    from soda_kernels.fused_linear_cross_entropy import (
        cost_model,
        default_grad_h_slices,
        default_vocab_slice,
    )
    from soda_mega.tokens import VocabLayout

    tokens, hidden, tps = (([8192, 16384], [512, 1024, 2048, 2560], [1, 2, 4]) if args.smoke
                           else (args.tokens, args.hidden, args.tp))
    elt = 4 if args.dtype == "fp32" and not args.smoke else 2
    dtype = torch.float32 if elt == 4 else torch.bfloat16
    layout = VocabLayout.soda_default()
    gpu = torch.device("cuda")  # the GPU plan (no device needed: sizes only)
    rows = []
    for tp in tps:
        v_local = SODA_VOCAB if tp == 1 else layout.padded_size(tp, 128) // tp
        for n in tokens:
            for h in hidden:
                cols = default_vocab_slice(h, v_local, gpu)
                slices = default_grad_h_slices(n, h, cols, v_local, dtype, gpu, "triton", True)
                cost = cost_model(n, n, h, v_local, elt, cols, main_grad=True,
                                  grad_h_slices=slices)
                rows.append({"op": "loss_cost", "tokens": n, "hidden": h, "vocab_local": v_local,
                             "tp": tp, "bytes_per_element": elt, "vocab_slice": cols,
                             "grad_h_slices": slices, **cost,
                             "flops_over_ideal": cost["flops"] / cost["ideal_flops"],
                             "bytes_over_ideal": cost["bytes"] / cost["ideal_bytes"]})
                plans = {name: plan_for_peak(n, h, v_local, dtype, PEAKS[name], 64, True, cols,
                                             slices) for name in ("H100", "H200")}
                chunk, group = plans["H100"].row_chunk, plans["H100"].group_rows
                cost = train_cost_model(n, n, h, v_local, elt, chunk, True, group_rows=group)
                rows.append({"op": "loss_cost_train", "tokens": n, "hidden": h,
                             "vocab_local": v_local, "tp": tp, "bytes_per_element": elt,
                             "row_chunk": chunk, "group_rows": group, **cost,
                             "flops_over_ideal": cost["flops"] / cost["ideal_flops"],
                             "bytes_over_ideal": cost["bytes"] / cost["ideal_bytes"]})
                for name, plan in plans.items():
                    rows.append({"op": "loss_plan", "tokens": n, "hidden": h,
                                 "vocab_local": v_local, "tp": tp, "device": name,
                                 "path": plan.path, "row_chunk": plan.row_chunk,
                                 "group_rows": plan.group_rows, "grad_h_slices": slices,
                                 "reason": plan.reason, "predicted": plan.predicted,
                                 "computed_not_measured": True})
    return rows


# ----------------------------------------------------------------------------- loss memory
def cpu_peak_bytes(torch, fn) -> int:
    """Peak bytes held by torch's CPU allocator while ``fn`` runs, above what it held before.

    Read from the profiler's allocator events (``profile_memory=True``: every allocation and
    free of torch's CPU allocator, with its running total); tracemalloc would not see torch's
    allocations and RSS would include the allocator's caching and the interpreter's own
    memory. The same method checks the training memory plan (tests/training).
    """
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e["args"] for e in json.loads(path.read_text())["traceEvents"]
                  if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - base


def run_memory(torch, args, dtype, device) -> tuple[list[dict], dict]:
    """Peak memory of one forward + backward at ``--memory-shape`` (all tokens active):
    fused loss vs materialised logits (``h @ W^T`` + ``F.cross_entropy``) vs the logits-free
    minimum ``W + grad_W + hidden + grad_hidden + one [N, S] slice``. The peaks include the
    inputs (created inside the measured region). On CPU the fused loss runs ``impl="torch"``:
    the same plan and buffers as the Triton path, whose interpreter would take hours here."""
    import torch.nn.functional as F

    from soda_kernels.fused_linear_cross_entropy import default_vocab_slice, fused_linear_cross_entropy

    n, h, v = args.memory_shape
    impl = "triton" if device.type == "cuda" else "torch"

    def make():
        g = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(n, h, generator=g, device=device).to(dtype).requires_grad_()
        weight = torch.randn(v, h, generator=g, device=device).mul_(h ** -0.5).to(dtype).requires_grad_()
        return hidden, weight, torch.randint(0, v, (n,), generator=g, device=device)

    def fused():
        hidden, weight, labels = make()
        fused_linear_cross_entropy(hidden, weight, labels, impl=impl).loss.sum().backward()

    def materialised():
        hidden, weight, labels = make()
        F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="sum").backward()

    def fused_train():
        hidden, weight, labels = make()
        weight = with_main_grad(torch, torch.nn.Parameter(weight.detach()))
        ones = torch.ones(n, device=device)
        fused_linear_cross_entropy(hidden, weight, labels, impl=impl,
                                   known_grad=ones).loss.sum().backward()

    def peak(fn):
        if device.type != "cuda":
            return cpu_peak_bytes(torch, fn)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    elt = torch.finfo(dtype).bits // 8
    cols = default_vocab_slice(h, v, device)
    minimum = (2 * v * h + 2 * n * h + n * cols) * elt
    # The training path in 16 bits adds into an fp32 main_grad: its minimum has that instead.
    minimum_train = minimum + (v * h * (4 - elt) if elt != 4 else 0)
    peaks = {"fused": peak(fused), "materialised": peak(materialised),
             "fused_train": peak(fused_train)}
    row = {"op": "loss_memory", "tokens": n, "hidden": h, "vocab_local": v, "impl": impl,
           "dtype": str(dtype).replace("torch.", ""), "vocab_slice": cols,
           "method": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                      else "torch CPU allocator events (torch.profiler, profile_memory=True)"),
           "peak_bytes": peaks, "logits_free_minimum_bytes": minimum,
           "fused_over_minimum": peaks["fused"] / minimum,
           "materialised_over_minimum": peaks["materialised"] / minimum,
           "materialised_over_fused": peaks["materialised"] / peaks["fused"],
           "logits_free_minimum_train_bytes": minimum_train,
           "fused_train_over_minimum": peaks["fused_train"] / minimum_train,
           "target_fused_over_minimum": 1.2}
    row["fused_target_met"] = row["fused_over_minimum"] <= row["target_fused_over_minimum"]
    row["fused_train_target_met"] = (row["fused_train_over_minimum"]
                                     <= row["target_fused_over_minimum"])
    return [row], {}


# ----------------------------------------------------------------------------- CPU measure
def run_cpu_loss(torch, args) -> tuple[list[dict], dict]:
    """fp32 forward + backward at ``--cpu-shape`` on the CPU, every path on the same inputs in
    this process: materialised logits (``h @ W^T`` + ``F.cross_entropy``), Megatron's
    ``vocab_parallel_cross_entropy`` on the same logits, the fused recompute path
    (``soda_torch``: 4 matmuls) and the training path (``soda_torch_train``: 3 matmuls, the
    gradients computed in the forward). Rows ``loss_cpu`` with ``speedup_over_materialised``."""
    import torch.nn.functional as F

    from soda_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    n, h, v = args.cpu_shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.nn.Parameter(torch.randn(v, h, generator=g) / h ** 0.5)
    labels = torch.randint(0, v, (n,), generator=g)
    ones = torch.ones(n)
    methods = {
        "materialised": lambda: F.cross_entropy(hidden @ weight.t(), labels, reduction="sum"),
        "soda_torch": lambda: fused_linear_cross_entropy(hidden, weight, labels,
                                                         impl="torch").loss.sum(),
        "soda_torch_train": lambda: fused_linear_cross_entropy(
            hidden, weight, labels, impl="torch", known_grad=ones).loss.sum(),
    }
    notes = {}
    try:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        methods["megatron"] = lambda: vocab_parallel_cross_entropy(
            (hidden @ weight.t())[:, None, :], labels[:, None]).sum()
    except ImportError as err:
        notes["megatron"] = f"not importable: {err}"
    for name in args.skip:
        methods.pop(name, None)
    rows = []
    for name, fn in methods.items():
        m = measure(torch, fn, (hidden, weight), args.iters, args.warmup)
        rows.append({"op": "loss_cpu", "tokens": n, "hidden": h, "vocab_local": v,
                     "dtype": "float32", "impl": name, "threads": torch.get_num_threads(), **m})
    base = next((r for r in rows if r["impl"] == "materialised"), None)
    for r in rows:
        if base is not None:
            r["speedup_over_materialised"] = base["fwd_bwd"] / r["fwd_bwd"]
            r["loss_rel_diff_vs_materialised"] = abs(r["value"] - base["value"]) / abs(base["value"])
    return rows, notes


def run_cpu_engines(torch, args) -> tuple[list[dict], dict]:
    """The fused Triton loss (in Triton's interpreter) at ``--engine-shape``, fp32, under the
    training contract: both designs x both GEMM engines (``TRAIN_DESIGNS``) and the measured
    choice among them, same inputs, same process (``loss_engine_cpu`` rows, each time over the
    Triton-engine three-matmul row's). Interpreter times: they show that both engines run side
    by side and what the measured choice does, nothing about a GPU."""
    from soda_kernels.fused_linear_cross_entropy import (
        fused_linear_cross_entropy,
        fused_linear_cross_entropy_reference,
    )

    n, h, v = args.engine_shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.nn.Parameter(torch.randn(v, h, generator=g) / h ** 0.5)
    labels = torch.randint(0, v, (n,), generator=g)
    ref = float(fused_linear_cross_entropy_reference(hidden, weight, labels).loss.sum())

    def train(impl, plan, engine):
        def fn(hh, ww, yy):
            return fused_linear_cross_entropy(hh, ww, yy, impl=impl, known_grad=torch.ones(n),
                                              loss_plan=plan, gemm_engine=engine).loss.sum()
        return fn

    rows = []
    for name, fn in train_design_methods(train).items():
        if name in args.skip:
            continue
        extra = (measured_choice(torch, fn, hidden, weight, labels)
                 if name == "soda_triton_train_measured" else {})
        m = measure(torch, functools.partial(fn, hidden, weight, labels), (hidden, weight),
                    args.iters, args.warmup)
        plan, engine = TRAIN_DESIGNS[name]
        rows.append({"op": "loss_engine_cpu", "tokens": n, "hidden": h, "vocab_local": v,
                     "dtype": "float32", "impl": name, "loss_plan": plan, "gemm_engine": engine,
                     "threads": torch.get_num_threads(), **m, **extra,
                     "loss_rel_diff_vs_reference": abs(m["value"] - ref) / abs(ref)})
    base = next((r for r in rows if r["impl"] == "soda_triton_train"), None)
    for r in rows:
        if base is not None:
            r["time_over_triton_three_matmul"] = r["fwd_bwd"] / base["fwd_bwd"]
    return rows, {}


# ----------------------------------------------------------------------------- embedding
def run_embedding(torch, args, dtype, device) -> tuple[list[dict], dict]:
    import torch.nn.functional as F

    from soda_kernels.interleaved_embedding import interleaved_embedding, interleaved_embedding_reference
    from soda_mega.tokens import VocabLayout

    layout = VocabLayout(text_vocab_size=258, bos_id=256, eos_id=257, codebook_size=16) \
        if args.smoke else VocabLayout.soda_default()
    kw = dict(text_vocab_size=layout.text_vocab_size, audio_base=layout.audio_base,
              codebook_size=layout.codebook_size, num_codebooks=layout.num_codebooks)
    methods = {
        "reference": lambda ids, w: interleaved_embedding_reference(ids, w, **kw).embeddings,
        "torch": lambda ids, w: F.embedding(ids, w),
        "soda_triton": lambda ids, w: interleaved_embedding(ids, w, **kw).embeddings,
    }
    notes = {}
    try:
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

        def megatron(ids, w, _cache={}):  # noqa: B006 - the one module built, kept across calls
            key = w.data_ptr()
            if key not in _cache:
                cfg = ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False,
                                          params_dtype=w.dtype)
                mod = VocabParallelEmbedding(w.shape[0], w.shape[1], init_method=None, config=cfg)
                mod.weight = w
                _cache.clear()
                _cache[key] = mod
            return _cache[key](ids)

        methods["megatron"] = megatron
    except ImportError as err:
        notes["megatron"] = f"not importable: {err}"
    for name in args.skip:
        methods.pop(name, None)
    rows = []
    for n in args.tokens:
        for h in args.hidden:
            g = torch.Generator(device=device).manual_seed(1)
            ids = torch.randint(0, layout.size, (n,), generator=g, device=device)
            weight = torch.nn.Parameter(torch.randn(layout.size, h, generator=g, device=device).to(dtype))
            grad = torch.randn(n, h, generator=g, device=device).to(dtype)
            for name, fn in methods.items():
                try:
                    # NOTE: measure() calls it within this iteration, so the loop names are current.
                    m = measure(torch, lambda: (fn(ids, weight) * grad).sum(), (weight,),  # noqa: B023
                                args.iters, args.warmup)
                except Exception as err:  # noqa: BLE001
                    rows.append({"op": "embedding", "tokens": n, "hidden": h,
                                 "vocab_local": layout.size, "impl": name,
                                 "error": f"{type(err).__name__}: {err}"[:300]})
                    continue
                rows.append({"op": "embedding", "tokens": n, "hidden": h,
                             "vocab_local": layout.size, "impl": name, **m})
    return rows, notes


# ----------------------------------------------------------------------------- reporting
def add_ratios(rows: list[dict]) -> None:
    """``speedup_of_triton`` = this implementation's time / soda_triton's time (same shape)."""
    def key(r):
        return r["op"], r.get("tokens"), r.get("hidden"), r.get("vocab_local"), r.get("tp")

    triton_rows = {key(r): r for r in rows if r.get("impl") == "soda_triton" and "fwd" in r}
    for r in rows:
        t = triton_rows.get(key(r))
        if t is not None and "fwd" in r:
            r["speedup_of_triton"] = {k: r[k] / t[k] for k in ("fwd", "bwd", "fwd_bwd") if t[k] > 0}


def check_targets(rows: list[dict], on_gpu: bool) -> list[dict]:
    """Issue 4 targets per shape (evaluated only on a GPU; CPU times are interpreter times)."""
    if not on_gpu:
        return [{"note": "targets are not evaluated on CPU"}]
    out = []
    by_shape: dict = {}
    for r in rows:
        if "fwd_bwd" in r or r["op"] == "loss_memory_budget":
            key = (r["op"].replace("_memory_budget", ""), r.get("tokens"), r.get("hidden"),
                   r.get("vocab_local"))
            by_shape.setdefault(key, {})[r.get("impl", "budget")] = r
    for (op, n, h, v), impls in sorted(by_shape.items()):
        tri = impls.get("soda_triton")
        if tri is None:
            continue
        item = {"op": op, "tokens": n, "hidden": h, "vocab_local": v}
        if op == "loss":
            if "torch_eager" in impls:
                item["vs_torch_eager"] = impls["torch_eager"]["fwd_bwd"] / tri["fwd_bwd"]
                item["eager_2x_met"] = item["vs_torch_eager"] >= 2.0
            best = [impls[k]["fwd_bwd"] for k in ("liger", "cce") if k in impls]
            if best:
                item["vs_best_liger_cce"] = min(best) / tri["fwd_bwd"]
                item["liger_cce_1.3x_met"] = item["vs_best_liger_cce"] >= 1.3
            budget = impls.get("budget", {}).get("budget_above_inputs_bytes")
            if budget and tri["peak_bytes"] is not None:
                item["peak_over_budget"] = tri["peak_bytes"] / budget
                item["memory_within_10pct_met"] = item["peak_over_budget"] <= 1.1
        elif "torch" in impls:
            item["bwd_vs_torch"] = impls["torch"]["bwd"] / tri["bwd"]
            item["embedding_bwd_2x_met"] = item["bwd_vs_torch"] >= 2.0
        out.append(item)
    return out


def markdown(payload: dict) -> str:
    prov = payload["provenance"]
    lines = [f"# bench_kernels ({'smoke, ' if payload['smoke'] else ''}{prov['device']['kind']}: "
             f"{prov['device']['name']})", "",
             f"commit `{prov['commit']}`, torch {prov['versions'].get('torch')}, "
             f"triton {prov['versions'].get('triton')}, dtype {payload['dtype']}", ""]
    if prov["device"]["kind"] != "cuda":
        lines += ["CPU run: Triton kernels ran in the interpreter; these times say nothing about "
                  "GPU performance." if payload["smoke"] else
                  "CPU measure: plain PyTorch in fp32 (the GEMM-engine table: the Triton kernels "
                  "in the interpreter); nothing here is a GPU figure.", ""]
    if any(r["op"] in ("loss", "embedding") for r in payload["rows"]):
        lines += ["| op | N | H | V_local | impl | fwd ms | bwd ms | fwd+bwd ms | peak MiB | "
                  "triton speedup (fwd+bwd) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if r["op"] not in ("loss", "embedding"):
            continue
        if "error" in r:
            lines.append(f"| {r['op']} | {r['tokens']} | {r['hidden']} | {r.get('vocab_local', '')} | "
                         f"{r['impl']} | error: {r['error'][:60]} | | | | |")
            continue
        peak = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        ratio = r.get("speedup_of_triton", {}).get("fwd_bwd")
        lines.append(f"| {r['op']} | {r['tokens']} | {r['hidden']} | {r['vocab_local']} | {r['impl']} | "
                     f"{r['fwd'] * 1e3:.2f} | {r['bwd'] * 1e3:.2f} | {r['fwd_bwd'] * 1e3:.2f} | {peak} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    cpu = [r for r in payload["rows"] if r["op"] == "loss_cpu"]
    if cpu:
        r0 = cpu[0]
        lines += ["", f"CPU loss forward + backward at N={r0['tokens']}, H={r0['hidden']}, "
                  f"V={r0['vocab_local']} (fp32, {r0['threads']} threads, median of "
                  f"{payload['iters']}; same process, same inputs):", "",
                  "| impl | fwd s | bwd s | fwd+bwd s | speedup over materialised |",
                  "|---|---|---|---|---|"]
        for r in cpu:
            lines.append(f"| {r['impl']} | {r['fwd']:.2f} | {r['bwd']:.2f} | {r['fwd_bwd']:.2f} | "
                         f"{r.get('speedup_over_materialised', float('nan')):.2f}x |")
    eng = [r for r in payload["rows"] if r["op"] == "loss_engine_cpu"]
    if eng:
        r0 = eng[0]
        lines += ["", f"Fused Triton loss, both designs x both GEMM engines, at N={r0['tokens']}, "
                  f"H={r0['hidden']}, V={r0['vocab_local']} (fp32, gradients known, "
                  f"{r0['threads']} threads, median of {payload['iters']}; same process, same "
                  "inputs). **Triton interpreter**: the custom kernels and the Triton engine's "
                  "matmuls are interpreted, the torch engine's GEMMs are not; nothing here is a "
                  "GPU figure:", "",
                  "| impl | loss_plan | gemm_engine | fwd s | bwd s | fwd+bwd s | x three_matmul/"
                  "triton | loss rel diff vs reference |", "|---|---|---|---|---|---|---|---|"]
        for r in eng:
            lines.append(f"| {r['impl']} | {r['loss_plan']} | {r['gemm_engine']} | {r['fwd']:.2f} | "
                         f"{r['bwd']:.2f} | {r['fwd_bwd']:.2f} | "
                         f"{r.get('time_over_triton_three_matmul', float('nan')):.2f} | "
                         f"{r['loss_rel_diff_vs_reference']:.1e} |")
    chosen = [r for r in payload["rows"] if r.get("impl") == "soda_triton_train_measured"
              and r.get("choice_line")]
    if chosen:
        lines += ["", "Measured loss plan (`soda_kernels.flce_measure`, one warm-up and the "
                  "median of the timed runs per candidate, forward + backward, on this device; "
                  "the roofline's prediction beside it):", ""]
        lines += [f"- {r['choice_line']}" for r in chosen]
    for op, title, extra in (
            ("loss_cost", "recompute path (`cost_model`: logits, recomputed logits, grad_W, "
             "grad_h)", "vocab_slice"),
            ("loss_cost_train", "training path (`soda_kernels.flce_train.train_cost_model`: "
             "logits per chunk, grad_h and grad_W per group of group_rows rows)", "row_chunk")):
        costs = [r for r in payload["rows"] if r["op"] == op]
        if not costs:
            continue
        lines += ["", f"Fused loss, {title}; one micro-batch (all tokens active, grad_W into "
                  f"fp32 main_grad; analytic, {costs[0]['bytes_per_element']} bytes per "
                  f"element, GPU {extra.replace('_', ' ')}):", "",
                  f"| N | H | V_local | TP | {extra.replace('_', ' ')} | GFLOP | ideal 6NHV GFLOP | "
                  "x ideal FLOPs | GB moved | ideal GB | x ideal bytes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in costs:
            lines.append(f"| {r['tokens']} | {r['hidden']} | {r['vocab_local']} | {r['tp']} | "
                         f"{r[extra]} | "
                         f"{r['flops'] / 1e9:.1f} | {r['ideal_flops'] / 1e9:.1f} | "
                         f"{r['flops_over_ideal']:.2f} | {r['bytes'] / 1e9:.2f} | "
                         f"{r['ideal_bytes'] / 1e9:.2f} | {r['bytes_over_ideal']:.2f} |")
    plans = [r for r in payload["rows"] if r["op"] == "loss_plan"]
    if plans:
        elt = next((r["bytes_per_element"] for r in payload["rows"] if r["op"] == "loss_cost"), 2)
        lines += ["", "Fused loss design a GPU run would choose (`soda_kernels.flce_plan."
                  f"choose_train_plan`; {elt} bytes per element, grad_W into fp32 main_grad): "
                  "roofline model per launch, datasheet peaks x efficiency; **computed, not "
                  "measured**:", "",
                  "| device | N | H | V_local | TP | choice | three matmuls: C, R / GB (main_grad) "
                  "/ ms | recompute: grad_h slices / GB / ms |", "|---|---|---|---|---|---|---|---|"]
        for r in plans:
            t3, rc = r["predicted"]["three_matmul"], r["predicted"]["recompute"]
            lines.append(f"| {r['device']} | {r['tokens']} | {r['hidden']} | {r['vocab_local']} | "
                         f"{r['tp']} | {r['path']} | {r['row_chunk']}, {r['group_rows']} / "
                         f"{t3['gb']:.1f} ({t3['main_grad_gb']:.1f}) / {t3['seconds'] * 1e3:.2f} | "
                         f"{r['grad_h_slices']} / {rc['gb']:.1f} / {rc['seconds'] * 1e3:.2f} |")
    for r in payload["rows"]:
        if r["op"] == "loss_memory":
            mib = {k: v / 2**20 for k, v in r["peak_bytes"].items()}
            lines += ["", f"Loss peak memory at N={r['tokens']}, H={r['hidden']}, "
                      f"V={r['vocab_local']} ({r['dtype']}, {r['method']}; fused impl "
                      f"{r['impl']}, slice {r['vocab_slice']}):", "",
                      f"- fused {mib['fused']:.0f} MiB = {r['fused_over_minimum']:.3f}x the "
                      f"logits-free minimum ({r['logits_free_minimum_bytes'] / 2**20:.0f} MiB: "
                      f"W + grad_W + hidden + grad_hidden + one slice); target <= "
                      f"{r['target_fused_over_minimum']}x: "
                      f"{'met' if r['fused_target_met'] else 'NOT met'}",
                      f"- training path (3 matmuls) {mib['fused_train']:.0f} MiB = "
                      f"{r['fused_train_over_minimum']:.3f}x its logits-free minimum "
                      f"({r['logits_free_minimum_train_bytes'] / 2**20:.0f} MiB); target <= "
                      f"{r['target_fused_over_minimum']}x: "
                      f"{'met' if r['fused_train_target_met'] else 'NOT met'}",
                      f"- materialised logits {mib['materialised']:.0f} MiB = "
                      f"{r['materialised_over_minimum']:.2f}x the minimum, "
                      f"{r['materialised_over_fused']:.2f}x the fused loss"]
    targets = [t for t in payload["targets"] if "op" in t]
    if targets:
        lines += ["", "Targets (issue 4):", ""] + [f"- {t}" for t in targets]
    if payload["notes"]:
        lines += ["", "Notes:"] + [f"- {k}: {v}" for k, v in payload["notes"].items()]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> str:
    from soda_mega.utils.plotting import NOT_INSTALLED, pyplot

    plt = pyplot()
    if plt is None:
        return NOT_INSTALLED
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, op in zip(axes, ("loss", "embedding")):
        rows = [r for r in payload["rows"] if r["op"] == op and "fwd_bwd" in r]
        labels = sorted({(r["tokens"], r["hidden"], r.get("vocab_local")) for r in rows})
        impls = sorted({r["impl"] for r in rows})
        for i, impl in enumerate(impls):
            vals = [next((r["fwd_bwd"] * 1e3 for r in rows if r["impl"] == impl and
                          (r["tokens"], r["hidden"], r.get("vocab_local")) == lab), 0) for lab in labels]
            ax.bar([x + i / (len(impls) + 1) for x in range(len(labels))], vals,
                   width=1 / (len(impls) + 1), label=impl)
        ax.set_xticks(range(len(labels)), [f"{n}x{h}\nV{v}" for n, h, v in labels], fontsize=6)
        ax.set_ylabel("fwd+bwd ms")
        ax.set_title(op)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    from soda_mega.utils.startup import import_torch_frozen

    import_torch_frozen()  # imported here so --help stays fast; frozen: this process's start
    import torch

    cpu_measure = not torch.cuda.is_available() and not args.smoke
    if not torch.cuda.is_available():
        # NOTE: must precede the first import of soda_kernels (Triton reads it at definition).
        # The CPU measure's engine table runs the Triton kernels in the interpreter too.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.smoke:
        from soda_kernels import flce_measure

        # the measured choice at tiny shapes: as many runs as the other rows, no more
        flce_measure.WARMUP, flce_measure.REPS = args.warmup, args.iters
    from soda_mega.config.schema import ParallelConfig
    from soda_mega.parallel import state
    from soda_mega.utils.provenance import write_json

    state.initialize(ParallelConfig(), seed=0)  # Megatron baselines need the (1-rank) TP group
    load_start = os.getloadavg()[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows, notes = [], {}
    if cpu_measure:
        # No GPU: the cost model, the memory row and fp32 CPU timings (the Triton kernels
        # would run in the interpreter, whose times say nothing).
        args.dtype = "fp32"
        if args.only in (None, "loss"):
            r, n = run_cpu_loss(torch, args)
            rows += r + run_cpu_engines(torch, args)[0] + cost_rows(torch, args)
            notes.update(n)
        notes["cpu"] = ("no CUDA GPU: CPU measure (loss_cpu timings in fp32, the GEMM engines in "
                        "Triton's interpreter, cost model, memory); "
                        "GPU timings need a GPU, --smoke runs the Triton kernels in the interpreter")
    elif args.only in (None, "loss"):
        r, n = run_loss(torch, args, dtype, device)
        rows += r + cost_rows(torch, args)
        notes.update(n)
    if args.only in (None, "embedding") and not cpu_measure:
        r, n = run_embedding(torch, args, dtype, device)
        rows += r
        notes.update({f"embedding/{k}": v for k, v in n.items()})
    if args.only == "memory" or (args.only is None and not args.skip_memory):
        mem_dtype = dtype if device.type == "cuda" else torch.float32
        r, _ = run_memory(torch, args, mem_dtype, device)
        rows += r
    # NOTE: a shared machine's other processes inflate CPU times (not the ratios' sign, but
    # their size): the 1-minute load average beside the core count says how shared it was.
    notes["load_average"] = (f"1-minute load average {load_start:.1f} at the start, "
                             f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores")
    add_ratios(rows)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_kernels_{device.type}{'_smoke' if args.smoke else ''}"
    notes["plot"] = plot({"rows": rows}, out_dir / f"{stem}.png")
    payload = {"smoke": args.smoke, "dtype": args.dtype, "iters": args.iters, "rows": rows,
               "targets": check_targets(rows, device.type == "cuda"), "notes": notes}
    path = write_json(out_dir / f"{stem}.json", payload)
    import json

    (out_dir / f"{stem}.md").write_text(markdown(json.loads(path.read_text())))
    print(f"wrote {path} and {stem}.md")
    state.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
