"""Training metrics: throughput / MFU arithmetic and the console + JSONL + TensorBoard (+ W&B) sink.

MFU = achieved model FLOP/s per GPU / the GPU's peak dense bf16 FLOP/s. Model FLOPs per token
are the exact count of :func:`soda_mega.model.accounting.flops_per_token` (forward + backward,
no recomputation counted). The peak comes from ``run.peak_tflops`` or, when unset, from the
GPU's name read through nvidia-ml-py and the table below (spec-sheet dense bf16 numbers).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from soda_mega.training.wandb_log import WandbLogger, scalars

# Dense (non-sparse) bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
}


def gpu_name() -> str | None:
    """The first GPU's product name from NVML, or None without an NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        finally:
            pynvml.nvmlShutdown()
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - no driver / no NVML: there is no GPU to rate
        return None


def peak_tflops(override: float | None = None) -> float | None:
    """Per-GPU peak bf16 TFLOP/s: the override, else the table entry for this GPU, else None."""
    if override:
        return override
    name = gpu_name()
    if not name:
        return None
    for key, value in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key.lower() in name.lower():
            return value
    return None


def memory_gib() -> dict[str, float]:
    """Peak GPU memory of this process (or host RSS on CPU), GiB."""
    if torch.cuda.is_available():
        return {"gpu_peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
                "gpu_peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    try:
        import psutil

        return {"host_rss_gib": psutil.Process().memory_info().rss / 2**30}
    except ImportError:
        return {}


class MetricsSink:
    """Writes metric records to the console, ``metrics.jsonl`` and TensorBoard (one rank only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, total_steps: int) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.started = time.time()
        self.path = run_dir / "metrics.jsonl"
        self._jsonl = None  # opened at the first record, after a resume has truncated the file
        self._tb = None
        self._wandb: WandbLogger | None = None
        self._tensorboard = tensorboard  # the writer is opened by start(), which knows the step
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)

    def start(self, step: int) -> None:
        """Cut ``metrics.jsonl`` back to ``step``, the step this run starts from (0 for a fresh
        start), so that its records match the checkpoints, and open TensorBoard's writer, which
        drops its events past ``step`` the same way; call before the first record."""
        if not self.enabled:
            return
        truncate_metrics(self.path, step)
        if self._tensorboard and self._tb is None:
            self._tb = _tensorboard_writer(self.path.parent / "tensorboard", step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._jsonl is None:
            self._jsonl = open(self.path, "a", encoding="utf-8")
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in scalars(record).items():
                self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(record)

    def open_wandb(self, run_cfg, config: dict, resumed: bool) -> None:
        """Also log to Weights & Biases when ``run.wandb_project`` is set (logging rank only)."""
        if self.enabled:
            self._wandb = WandbLogger.open(self.path.parent, run_cfg, config, resumed)

    def console(self, step: int, text: str, steps_done_this_run: int) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.started
        remaining = self.total_steps - step
        eta = elapsed / max(steps_done_this_run, 1) * remaining
        print(f"[step {step:>7}/{self.total_steps} {100 * step / self.total_steps:5.1f}% "
              f"eta {_hms(eta)}] {text}", flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def _tensorboard_writer(folder: Path, step: int):
    """A SummaryWriter on ``folder`` for a run that starts from ``step``, or None (a notice)
    without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("soda-mega: tensorboard is not installed; logging to console and JSONL only",
              file=sys.stderr)
        return None
    # NOTE: event files are append-only: a run resumed from an earlier checkpoint would add a
    # second value for every step logged after it. purge_step writes a session-start marker
    # from which readers (TensorBoard, EventAccumulator) discard the older files' events at
    # steps >= step + 1, as truncate_metrics does for metrics.jsonl.
    return SummaryWriter(str(folder), purge_step=step + 1)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of ``path`` past ``step`` (logged after the checkpoint a run resumes
    from, or by a run killed before its first save), and lines that are not a JSON record (a
    last line torn by a kill), saying so."""
    if not path.is_file():
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    kept, torn, later = [], [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            torn.append(number)
            continue
        if record_step <= step:
            kept.append(line)
        else:
            later += 1
    if torn:
        where = "its last line" if torn == [len(lines)] else f"line(s) {torn[:5]}"
        print(f"soda-mega: {path}: dropped {where}: not a complete JSON record (torn by a kill?)",
              file=sys.stderr, flush=True)
    if torn or later:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
