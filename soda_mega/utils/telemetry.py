"""GPU telemetry through NVML (nvidia-ml-py), sampled by a background thread.

What is sampled, for one GPU, every ``interval_s`` seconds:

==================  ===========================================================  ======
key                 NVML call                                                    unit
==================  ===========================================================  ======
gpu_util            ``nvmlDeviceGetUtilizationRates().gpu`` (share of the last   %
                    sample period in which a kernel ran; not SM occupancy)
gpu_mem_used_gib    ``nvmlDeviceGetMemoryInfo().used`` (all processes, CUDA      GiB
                    context included: more than ``torch.cuda.memory_allocated``)
gpu_power_w         ``nvmlDeviceGetPowerUsage()``                                W
gpu_sm_clock_mhz    ``nvmlDeviceGetClockInfo(NVML_CLOCK_SM)``                    MHz
gpu_temp_c          ``nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU)``           C
==================  ===========================================================  ======

Summaries (:meth:`GpuTelemetry.summary` for the whole run, :meth:`GpuTelemetry.window` for
the samples since the previous window, which the trainer logs every ``run.log_interval``)
give the mean under the key itself, the maximum under ``<key>_max``, the minimum of the SM
clock under ``gpu_sm_clock_mhz_min`` (a falling clock means power or thermal throttling) and
the sample count under ``gpu_samples``.

Why a thread: NVML reports instantaneous values; sampling from the training loop would tie the
rate to the step time and see only the moments between steps. NVML calls are thread-safe and
take microseconds, so a 1 s period costs nothing measurable.

Without an NVIDIA driver or without nvidia-ml-py, the sampler prints one line to stderr (once
per process) and every summary is ``{}``: callers never need to check. A field that the GPU
does not report (e.g. power on some boards) is left out of the summaries, not an error.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

FIELDS = ("gpu_util", "gpu_mem_used_gib", "gpu_power_w", "gpu_sm_clock_mhz", "gpu_temp_c")

_NOTICE_SHOWN = False


def _notice_once(text: str) -> None:
    global _NOTICE_SHOWN
    if not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        print(text, file=sys.stderr, flush=True)


class _Aggregate:
    """Running count / sum / min / max per field (a run can last weeks: no sample list)."""

    def __init__(self) -> None:
        self.n = 0
        self.count = dict.fromkeys(FIELDS, 0)
        self.total = dict.fromkeys(FIELDS, 0.0)
        self.low = dict.fromkeys(FIELDS, math.inf)
        self.high = dict.fromkeys(FIELDS, -math.inf)

    def add(self, sample: dict[str, float | None]) -> None:
        self.n += 1
        for key in FIELDS:
            value = sample.get(key)
            if value is None:
                continue
            self.count[key] += 1
            self.total[key] += value
            self.low[key] = min(self.low[key], value)
            self.high[key] = max(self.high[key], value)

    def summary(self) -> dict[str, float]:
        if not self.n:
            return {}
        out: dict[str, float] = {}
        for key in FIELDS:
            if self.count[key]:
                out[key] = self.total[key] / self.count[key]
                out[f"{key}_max"] = self.high[key]
        if self.count["gpu_sm_clock_mhz"]:
            out["gpu_sm_clock_mhz_min"] = self.low["gpu_sm_clock_mhz"]
        out["gpu_samples"] = self.n
        return out


def _load_nvml():
    import pynvml  # nvidia-ml-py

    return pynvml


def _current_cuda_bus_id() -> str | None:
    """PCI bus id of torch's current CUDA device, to find the same GPU in NVML.

    NVML numbers GPUs physically while CUDA_VISIBLE_DEVICES renumbers them for CUDA, so an
    index is only right by accident; the bus id is the same in both.
    """
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except Exception:  # noqa: BLE001 - older torch without the pci_* fields: use the index
        return None


class GpuTelemetry:
    """Samples one GPU in a daemon thread; use as a context manager or ``start()``/``stop()``.

    ``nvml`` is the NVML module (default: ``import pynvml``); tests pass a fake. ``device``
    is an NVML index; by default the GPU torch is using (by PCI bus id), else index 0.
    ``keep`` recent raw samples stay in :attr:`samples` for inspection.
    """

    def __init__(self, interval_s: float = 1.0, device: int | None = None, nvml: Any = None,
                 keep: int = 4096, clock: Callable[[], float] = time.time) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.clock = clock
        self.samples: collections.deque = collections.deque(maxlen=keep)
        self.available = False
        self.notice: str | None = None
        self.device_name: str | None = None
        self._lock = threading.Lock()
        self._run = _Aggregate()
        self._window = _Aggregate()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._handle = None
        try:
            nvml = _load_nvml() if nvml is None else nvml
            nvml.nvmlInit()
        except Exception as err:  # noqa: BLE001 - no driver / no library: telemetry is off
            reason = f"{type(err).__name__}: {err}".strip().rstrip(":")
            self.notice = f"soda-mega: GPU telemetry off: NVML unavailable ({reason}); no NVIDIA driver?"
            _notice_once(self.notice)
            return
        try:
            self._handle = self._find_handle(nvml, device)
            name = nvml.nvmlDeviceGetName(self._handle)
            self.device_name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as err:  # noqa: BLE001
            self.notice = f"soda-mega: GPU telemetry off: no NVML device ({type(err).__name__}: {err})"
            _notice_once(self.notice)
            try:
                nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            return
        self._nvml = nvml
        self.available = True

    @staticmethod
    def _find_handle(nvml, device: int | None):
        if device is None:
            bus_id = _current_cuda_bus_id()
            if bus_id is not None:
                try:
                    return nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
                except Exception:  # noqa: BLE001 - fall back to the index
                    pass
            # NOTE: best effort: right when each rank sees all GPUs (torchrun's default).
            device = int(os.environ.get("LOCAL_RANK", "0"))
        return nvml.nvmlDeviceGetHandleByIndex(device)

    # ------------------------------------------------------------------ sampling
    def sample(self) -> dict[str, float | None]:
        """Read every field once (``None`` for a field this GPU does not report)."""
        nvml, h = self._nvml, self._handle

        def read(fn):
            try:
                return float(fn())
            except Exception:  # noqa: BLE001 - NVML_ERROR_NOT_SUPPORTED and friends
                return None

        return {
            "time": self.clock(),
            "gpu_util": read(lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu),
            "gpu_mem_used_gib": read(lambda: nvml.nvmlDeviceGetMemoryInfo(h).used / 2**30),
            "gpu_power_w": read(lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
            "gpu_sm_clock_mhz": read(lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)),
            "gpu_temp_c": read(lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
        }

    def record(self, sample: dict[str, float | None]) -> None:
        with self._lock:
            self.samples.append(sample)
            self._run.add(sample)
            self._window.add(sample)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.record(self.sample())

    def start(self) -> GpuTelemetry:
        """Take a first sample now, then one every ``interval_s`` in the background (a no-op
        without NVML or when already running)."""
        if self.available and self._thread is None:
            self.record(self.sample())
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="soda-gpu-telemetry",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        """Stop sampling (one last sample is taken) and return the run summary."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10 * self.interval_s + 5)
            self._thread = None
            self.record(self.sample())
        return self.summary()

    def close(self) -> None:
        self.stop()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._nvml = None
            self.available = False

    def __enter__(self) -> GpuTelemetry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ summaries
    def summary(self) -> dict[str, float]:
        """Mean / max (SM clock also min) of every sample since construction; {} without NVML."""
        with self._lock:
            return self._run.summary()

    def window(self) -> dict[str, float]:
        """Like :meth:`summary` over the samples since the previous ``window()`` call."""
        with self._lock:
            out = self._window.summary()
            self._window = _Aggregate()
        return out

    def reset(self) -> None:
        """Forget all samples (e.g. after a warm-up)."""
        with self._lock:
            self.samples.clear()
            self._run = _Aggregate()
            self._window = _Aggregate()
