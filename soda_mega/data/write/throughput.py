"""``soda-mega data plan``: wall time and GPU-hours of a ``data build`` from measured rates.

The rates come only from a ``benchmarks/bench_codec.py`` JSON (its ``rates`` entry): the codec's
seconds of audio per second on one device, the node's rate with every GPU busy (when measured),
and one feeder process's decode + resample rate. Nothing is assumed: without a GPU
measurement there is no GPU projection.

    per-GPU rate  = codec rate x node scaling (node rate / (GPUs x codec rate), when measured)
                    capped by the feeders: feeder rate x (CPU cores per GPU - 1)
    wall time     = audio hours / (GPUs x per-GPU rate);   GPU-hours = wall time x GPUs
    audio tokens  = audio seconds x 12.5 frames/s x codebooks
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from soda_mega.data.codec import MIMI_FRAME_RATE

REQUIRED = ("device", "codec_audio_s_per_s_per_device", "feeder_audio_s_per_s_per_process")


class ThroughputError(ValueError):
    """The measurement cannot give the projection asked for; the message says why."""


def load_rates(path: str | Path) -> dict:
    """The ``rates`` entry of a bench_codec JSON (``ThroughputError`` naming the file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ThroughputError(f"{path} does not exist; run benchmarks/bench_codec.py on a GPU to make it")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ThroughputError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    rates = payload.get("rates") if isinstance(payload, dict) else None
    if not isinstance(rates, dict) or any(k not in rates for k in REQUIRED):
        raise ThroughputError(f"{path} is not a bench_codec result (no 'rates' with {', '.join(REQUIRED)})")
    if not rates["codec_audio_s_per_s_per_device"]:
        raise ThroughputError(f"{path}: no encode setting succeeded (see its 'encode' rows)")
    return rates


def project(rates: dict, hours: float, gpus: int, *, cpus_per_gpu: int | None = None,
            num_codebooks: int | None = None) -> dict:
    """Projection of a build of ``hours`` of audio on ``gpus`` GPUs (see the module docstring)."""
    if hours <= 0 or gpus < 1:
        raise ThroughputError(f"need --hours > 0 and --gpus >= 1, got {hours} and {gpus}")
    if rates["device"] != "cuda":
        raise ThroughputError(f"the rates were measured on {rates['device']}, not on a GPU: a GPU "
                              "projection needs benchmarks/bench_codec.py run on a GPU (no GPU rate is ever "
                              "assumed)")
    codec = float(rates["codec_audio_s_per_s_per_device"])
    feeder = float(rates["feeder_audio_s_per_s_per_process"])
    scaling = 1.0
    if rates.get("node_audio_s_per_s") and rates.get("node_gpus"):
        scaling = min(1.0, float(rates["node_audio_s_per_s"]) / (codec * int(rates["node_gpus"])))
    per_gpu = codec * scaling
    limited_by = "codec (GPU)"
    if cpus_per_gpu is not None:
        fed = feeder * max(1, cpus_per_gpu - 1)
        if fed < per_gpu:
            per_gpu, limited_by = fed, f"feeders (CPU decode/resample, {max(1, cpus_per_gpu - 1)} per GPU)"
    wall_s = hours * 3600.0 / (gpus * per_gpu)
    k = num_codebooks or int(rates.get("num_codebooks") or 8)
    return {"audio_hours": hours, "gpus": gpus, "per_gpu_audio_s_per_s": per_gpu,
            "codec_audio_s_per_s_per_gpu": codec, "node_scaling": scaling, "limited_by": limited_by,
            "feeders_needed_per_gpu": math.ceil(per_gpu / feeder) if feeder else None,
            "wall_hours": wall_s / 3600.0, "wall_days": wall_s / 86400.0, "gpu_hours": wall_s * gpus / 3600.0,
            "audio_tokens": hours * 3600.0 * MIMI_FRAME_RATE * k, "num_codebooks": k,
            "best_setting": rates.get("best_setting"), "smoke": bool(rates.get("smoke"))}


def plan_lines(p: dict, source: str) -> list[str]:
    lines = [f"data build of {p['audio_hours']:,.0f} h of audio on {p['gpus']} GPUs (rates from {source}):",
             f"  per GPU      {p['per_gpu_audio_s_per_s']:,.1f} s of audio per s (codec alone "
             f"{p['codec_audio_s_per_s_per_gpu']:,.1f}, node scaling {p['node_scaling']:.2f}; limited by "
             f"{p['limited_by']}; best setting {p['best_setting']})",
             f"  wall time    {p['wall_hours']:,.1f} h ({p['wall_days']:.2f} days)",
             f"  GPU-hours    {p['gpu_hours']:,.1f}",
             f"  CPU feeders  {p['feeders_needed_per_gpu']} decode/resample processes per GPU keep up",
             f"  tokens       {p['audio_tokens']:,.0f} audio tokens ({p['num_codebooks']} codebooks)"]
    if p["smoke"]:
        lines.append("  WARNING: the rates come from a --smoke run (tiny shapes): not a real measurement")
    return lines
