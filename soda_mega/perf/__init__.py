"""Performance measurement: the real training step under a stopwatch, the profiler breakdown,
the matmul ceiling, and the cost projection for SODA-scale runs (issue 6).

``harness`` sets up :class:`~soda_mega.training.trainer.Trainer` for measurement;
``throughput`` is the tokens/s + MFU benchmark (``soda-mega bench throughput``,
``benchmarks/bench_throughput.py``); ``gemm`` measures the matmul peak it is compared with;
``profiling`` records and classifies a ``torch.profiler`` trace (``soda-mega profile``);
``cost`` turns measured throughput into GPU-hours (``soda-mega bench cost``). The memory
planner is :mod:`soda_mega.training.plan` and GPU telemetry :mod:`soda_mega.utils.telemetry`.
"""
