"""The matmul ceiling of this device, measured: the denominator of "MFU vs measured peak".

A spec-sheet peak (989 dense bf16 TFLOP/s for an H100 SXM) is a lead, not a measurement: clocks
under power limits, the cuBLAS kernel chosen and the shape all move it. This times one large
square ``torch.matmul`` the way METHOD.md asks: random inputs (never zeros), several input sets
rotated so repeated runs do not measure the cache, warm-up first (handle creation, kernel
selection), device events on a GPU, and the median of many repetitions with the spread
reported. On a GPU in bf16 (the training dtype); on a CPU in fp32, labelled as such: a CPU
number says nothing about a GPU.
"""

from __future__ import annotations

import statistics
import time

import torch


def matmul_peak(dev: torch.device, dtype: torch.dtype, n: int, iters: int = 20, warmup: int = 5,
                sets: int = 3) -> dict:
    """Median TFLOP/s of ``[n, n] @ [n, n]`` on ``dev`` (``2 n^3`` FLOPs per product)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = [tuple(torch.randn(n, n, generator=g).to(dev, dtype) for _ in range(2))
              for _ in range(sets)]
    out = torch.empty(n, n, device=dev, dtype=dtype)
    cuda = dev.type == "cuda"
    times = []
    for i in range(warmup + iters):
        a, b = inputs[i % sets]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            seconds = time.perf_counter() - t0
        if i >= warmup:
            times.append(seconds)
    if not torch.isfinite(out).all():
        raise RuntimeError("matmul benchmark produced non-finite values")
    median = statistics.median(times)
    flops = 2.0 * n ** 3
    name = str(dtype).replace("torch.", "")
    return {
        "tflops": flops / median / 1e12,
        "tflops_min": flops / max(times) / 1e12,
        "tflops_max": flops / min(times) / 1e12,
        "median_seconds": median,
        "n": n,
        "dtype": name,
        "iters": iters,
        "device": dev.type,
        "label": f"{'GPU' if cuda else 'CPU'} {name} GEMM {n}x{n}x{n} (torch.matmul), median of {iters}",
    }
