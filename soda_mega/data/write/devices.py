"""Which devices run the codec of a ``data build``, and which worker gets which.

* **CPU path** (no GPU, ``data.codec_device=cpu``, no ``data.codec_devices``): as before,
  ``data.build_workers`` processes, each reading, encoding (its own CPU Mimi) and tokenizing.
* **Device path** (GPUs visible with ``codec_device`` auto/cuda, or ``data.codec_devices``
  given): one codec worker per device, each holding the only codec on its device, and
  :func:`feeders_per_device` CPU processes per device that decode and resample audio ahead of
  it; the worker pads their output into batches of ``data.encode_batch_size``. A worker takes
  the next free slot when it starts, and slot ``i`` runs on ``devices[i % len(devices)]``, so
  with one worker per device every worker has its own device.
"""

from __future__ import annotations

import re

DEVICE_RE = re.compile(r"^(cpu|cuda)(:\d+)?$")
MAX_FEEDERS = 16


def check_device_names(names: list[str], field: str = "data.codec_devices") -> None:
    """``ValueError`` naming the field for anything but ``cpu[:N]`` / ``cuda[:N]``."""
    bad = [n for n in names if not DEVICE_RE.match(str(n))]
    if bad:
        raise ValueError(f"{field}: {', '.join(map(repr, bad))} is not a device; use cuda:N (or cpu, "
                         "cpu:N to run the device path on CPU)")


def codec_devices(configured: list[str], codec_device: str) -> list[str]:
    """The codec devices of a build (empty: the CPU path).

    ``configured`` (``data.codec_devices``) wins; else every visible GPU when
    ``codec_device`` is ``auto`` or ``cuda`` (``CUDA_VISIBLE_DEVICES`` is respected), else none.
    """
    if configured:
        check_device_names(configured)
        if any(d.startswith("cuda") for d in configured):
            _require_cuda("data.codec_devices names a cuda device")
        return list(configured)
    if codec_device == "cpu":
        return []
    import torch

    if not torch.cuda.is_available():
        if codec_device == "cuda":
            _require_cuda("data.codec_device is 'cuda'")
        return []
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def _require_cuda(what: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} but no CUDA device is available; use auto or cpu")


def device_for_slot(devices: list[str] | tuple[str, ...], slot: int) -> str:
    """The device of the worker that took slot ``slot`` (round robin)."""
    return devices[slot % len(devices)]


def feeders_per_device(num_devices: int, cpus: int) -> int:
    """CPU decode/resample processes per codec device: the cores left after one per codec
    worker, shared evenly, at least 1 and at most :data:`MAX_FEEDERS`."""
    return max(1, min(MAX_FEEDERS, (cpus - num_devices) // max(1, num_devices)))
