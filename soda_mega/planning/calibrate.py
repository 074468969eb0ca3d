"""Replace assumed constants with what a GPU campaign measured (``benchmarks/results/gpu_*.json``).

From the newest campaign result of the planned GPU kind (written by
``python -m soda_mega.perf.campaign_report convert``), and only from fields it holds:

* ``gemm_large``: the env phase's bf16 matmul peak over the datasheet peak;
* ``fused_loss_scale``: median over the kernel rows of soda-mega's fused loss
  (``soda_triton`` / ``soda_triton_train``) of measured fwd+bwd seconds over the roofline's
  prediction at the same shape (:func:`soda_mega.planning.steptime._soda_loss_seconds`);
* ``embedding_scale``: the same for the Triton embedding against its bytes at the HBM rate.

Everything else stays assumed, and :class:`Calibration` lists which is which. A CPU smoke
result, another GPU's result, or a missing field changes nothing: no number is invented.
Attention has no standalone campaign row yet, so its efficiencies stay the published ones.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from soda_mega.planning.constants import CAMPAIGN_FITTABLE, Efficiencies
from soda_mega.planning.hardware import GpuSpec

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

#: device-name fragments (``torch.cuda.get_device_name``) -> planner GPU kind, most specific first
DEVICE_KINDS = (("H100 NVL", "H100 NVL"), ("H100 PCIe", "H100 PCIe"), ("H200", "H200"),
                ("H100", "H100 SXM"), ("A100", "A100"))


@dataclass
class Calibration:
    """The GPU and constants to plan with, and which of them a campaign measured."""

    gpu: GpuSpec
    eff: Efficiencies
    measured: dict = field(default_factory=dict)   # name -> {"value", "source", "samples"}

    @property
    def assumed(self) -> list[str]:
        return [name for name in CAMPAIGN_FITTABLE if name not in self.measured]


def device_kind(name: str) -> str | None:
    """The planner's GPU name prefix for a CUDA device name, or None."""
    for fragment, kind in DEVICE_KINDS:
        if fragment.lower() in name.lower():
            return kind
    return None


def _matches(gpu: GpuSpec, device_name: str) -> bool:
    kind = device_kind(device_name)
    return kind is not None and gpu.name.startswith(kind)


def newest_for(gpu: GpuSpec, results_dir: Path = RESULTS) -> Path | None:
    """The newest non-smoke ``gpu_*.json`` campaign result measured on ``gpu``'s kind."""
    best = None
    for path in sorted(Path(results_dir).glob("gpu_*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if payload.get("benchmark") != "gpu_campaign" or payload.get("smoke"):
            continue
        name = payload.get("provenance", {}).get("device", {}).get("name", "")
        if not _matches(gpu, name):
            continue
        key = payload.get("campaign", {}).get("started_utc", "")
        if best is None or key > best[0]:
            best = (key, path)
    return best[1] if best else None


def fit(payload: dict, gpu: GpuSpec, source: str, eff: Efficiencies | None = None) -> Calibration:
    """Constants measured by one converted campaign result (see the module docstring)."""
    from soda_mega.planning.steptime import E, _soda_loss_seconds

    eff = eff or Efficiencies()
    cal = Calibration(gpu, eff)
    phases = payload.get("phases", {})
    peak = (phases.get("env", {}).get("matmul_peak") or {}).get("tflops")
    if peak:
        cal.gpu = dataclasses.replace(cal.gpu, gemm_large=peak * 1e12 / gpu.peak_flops)
        cal.measured["gemm_large"] = {"value": cal.gpu.gemm_large, "source": f"{source} env.matmul_peak",
                                      "samples": 1}
    rows = [r for name in ("kernels", "kernels_triton") for r in phases.get(name, {}).get("rows", [])]
    loss, emb = [], []
    for r in rows:
        t, n, h, v = r.get("fwd_bwd"), r.get("tokens"), r.get("hidden"), r.get("vocab_local")
        if not (t and n and h and v):
            continue
        if r.get("op") == "loss" and r.get("impl") in ("soda_triton", "soda_triton_train"):
            loss.append(t / _soda_loss_seconds(int(n), int(h), int(v), gpu)[0])
        elif r.get("op") == "embedding" and r.get("impl") == "soda_triton":
            predicted = n * h * (2 * E + E + 8) / (gpu.hbm_bytes_per_s * gpu.hbm_efficiency)
            emb.append(t / predicted)
    changes = {}
    for name, ratios, where in (("fused_loss_scale", loss, "kernels (soda_triton loss rows)"),
                                ("embedding_scale", emb, "kernels (soda_triton embedding rows)")):
        if ratios:
            changes[name] = statistics.median(ratios)
            cal.measured[name] = {"value": changes[name], "source": f"{source} {where}",
                                  "samples": len(ratios)}
    cal.eff = dataclasses.replace(eff, **changes)
    return cal


def calibration_for(gpu: GpuSpec, results: str | None = "default") -> Calibration:
    """The calibration to plan ``gpu`` with: from the newest matching campaign result in
    ``benchmarks/results`` (``results="default"``), a given file, or none (``None``)."""
    if results is None:
        return Calibration(gpu, Efficiencies())
    path = newest_for(gpu) if results == "default" else Path(results)
    if path is None:
        return Calibration(gpu, Efficiencies())
    return fit(json.loads(Path(path).read_text()), gpu, Path(path).name)
