"""Kernel launches that can be recorded instead of run: the production arguments of each kernel.

Every Triton launch of :mod:`.fused_linear_cross_entropy` and :mod:`.interleaved_embedding`
goes through :func:`launch`. Inside :func:`record_launches` nothing runs: each launch is
appended to a list with its role, kernel and the exact positional arguments and constexprs the
launcher built. :mod:`.compile_check` calls the real launchers on ``meta`` tensors (shapes and
strides, no data) under it, so the kernels are compiled for sm_90 with the argument values --
and hence the divisibility by 16 that Triton's JIT specialises on -- that production passes,
not with values a separate description would have to keep in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_RECORDERS: list[list[Launch]] = []
_OBSERVERS: list[list[Launch]] = []


@dataclass
class Launch:
    """One recorded launch. ``kernel`` is the ``@triton.jit`` function (never the autotuner);
    ``args`` its positional runtime arguments; ``consts`` the constexprs the launcher passed
    (without the tile configuration when the autotuner would choose it: ``tuned``)."""

    role: str
    kernel: Any
    grid: Any
    args: tuple
    consts: dict
    tuned: bool

    @property
    def named(self) -> dict:
        """Runtime arguments by parameter name."""
        return dict(zip(self.kernel.arg_names, self.args))


@contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Within the block, :func:`launch` records instead of running (nestable, per thread of use)."""
    calls: list[Launch] = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.remove(calls)


@contextmanager
def observe_launches() -> Iterator[list[Launch]]:
    """Within the block, :func:`launch` runs as usual and also appends each launch (with the
    tile configuration it ran with: ``tuned`` is True where the autotuner chose it). Tests
    compare the configurations that really ran with :mod:`.compile_check`'s list."""
    calls: list[Launch] = []
    _OBSERVERS.append(calls)
    try:
        yield calls
    finally:
        _OBSERVERS.remove(calls)


def recording() -> bool:
    return bool(_RECORDERS)


def gpu_like(device) -> bool:
    """A CUDA device, or ``meta`` while launches are recorded (compile_check's production
    launches take the GPU's plan: tile sizes, row padding, autotuned configs)."""
    return device.type == "cuda" or (device.type == "meta" and recording())


def launch(role: str, kernel, grid, args: tuple, consts: dict,
           tuner: Callable[[], Any] | None = None) -> None:
    """Run ``kernel[grid](*args, **consts)``, or through ``tuner()`` (its autotuner) when
    given; inside :func:`record_launches` only record it."""
    if _RECORDERS:
        _RECORDERS[-1].append(Launch(role, kernel, grid, tuple(args), dict(consts), tuner is not None))
        return
    for calls in _OBSERVERS:
        calls.append(Launch(role, kernel, grid, tuple(args), dict(consts), tuner is not None))
    (tuner() if tuner is not None else kernel)[grid](*args, **consts)
