"""What SODA's runs cost on a cluster, from a measured tokens/s per GPU (issue 6, item 5).

For each preset at ``tokens`` (SODA: 500B)::

    GPU-hours  = tokens / (tokens/s per GPU) / 3600
    wall days  = GPU-hours / GPUs / 24          (assumes the per-GPU rate holds at that scale)
    FLOPs      = training FLOPs per token x tokens    (exact count, two conventions)

next to SODA's reported ~1.3e22 FLOPs for the 4B run. The exact count
(:func:`soda_mega.model.accounting.flops_per_token`) is given with full-sequence attention
(Chinchilla's convention) and causal attention (half the score and value FLOPs), and 6ND.

Where the rate comes from, per preset:

* ``measured``: a successful row of that preset in the throughput results (the fastest
  variant), or ``--tokens-per-s-per-gpu`` given for ``--for-preset``;
* ``projected``: a preset without its own measurement runs at the model TFLOP/s per GPU of
  the measured case nearest in FLOPs per token (or ``--tflops-per-gpu``), i.e. at the same
  MFU; a lead, not a measurement.

A results file from a CPU smoke run (or any non-CUDA device) is accepted so the command can
be tested, and the output then says, at the top and the bottom, that it is meaningless.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

SODA_4B_REPORTED_FLOPS = 1.3e22
SODA_TOKENS = 500e9
SODA_PRESETS = ("soda-135m", "soda-600m", "soda-1.7b", "soda-4b")
SMOKE_BANNER = ("!!! This projection is from a CPU smoke run: it is MEANINGLESS for GPU planning. "
                "Measure on the GPU (soda-mega bench throughput) and run this again. !!!")


def gpu_hours(tokens: float, tokens_per_s_per_gpu: float) -> float:
    """GPU-hours to train on ``tokens`` at a per-GPU rate."""
    return tokens / tokens_per_s_per_gpu / 3600


def wall_days(hours_of_gpus: float, gpus: int) -> float:
    """Wall-clock days of ``hours_of_gpus`` GPU-hours spread over ``gpus`` GPUs."""
    return hours_of_gpus / gpus / 24


def preset_flops(preset: str, tokens: float) -> dict:
    """Training FLOPs of ``preset`` over ``tokens``: exact (full / causal attention) and 6ND."""
    from soda_mega.config import load_config
    from soda_mega.model.accounting import flops_per_token
    from soda_mega.tokens.layout import VocabLayout

    cfg = load_config(preset=preset)
    vocab = VocabLayout.from_config(cfg.vocab).size
    full = flops_per_token(cfg.model, vocab)
    causal = flops_per_token(cfg.model, vocab, causal=True)
    return {"per_token_full": full.training, "per_token_causal": causal.training,
            "full": full.training * tokens, "causal": causal.training * tokens,
            "six_nd": full.six_n * tokens, "seq_length": cfg.model.seq_length}


def read_results(path: str | Path) -> dict:
    """The measured rows of a throughput results file, and whether it is a GPU measurement."""
    payload = json.loads(Path(path).read_text())
    if payload.get("benchmark") != "throughput" or "rows" not in payload:
        raise ValueError(f"{path} is not a bench_throughput result (no 'rows'); produce one with "
                         "`soda-mega bench throughput`")
    prov = payload.get("provenance", {})
    device = prov.get("device", {})
    smoke = bool(payload.get("smoke")) or device.get("kind") != "cuda"
    best: dict[str, dict] = {}
    for row in payload["rows"]:
        if row.get("status") != "ok":
            continue
        key = row["case"]
        if key not in best or row["tokens_per_s_per_gpu"] > best[key]["tokens_per_s_per_gpu"]:
            best[key] = row
    return {"path": str(path), "smoke": smoke, "device": device, "commit": prov.get("commit"),
            "rows": best}


def project(gpus: int, tokens: float = SODA_TOKENS, results: dict | None = None,
            tokens_per_s: float | None = None, for_preset: str | None = None,
            tflops_per_gpu: float | None = None, presets=SODA_PRESETS) -> dict:
    """Cost rows for ``presets``; the rate of each from the sources described in the module doc."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    flops = {p: preset_flops(p, tokens) for p in presets}
    # measured sources: name -> (tokens/s per GPU, model TFLOP/s per GPU, FLOPs per token, label)
    sources: dict[str, tuple[float, float, float, str]] = {}
    if results is not None:
        for case, row in results["rows"].items():
            sources[case] = (row["tokens_per_s_per_gpu"], row["model_tflops_per_gpu"],
                             row["training_flops_per_token"], f"{case} ({row['variant']})")
    if tokens_per_s is not None:
        if for_preset not in flops:
            raise ValueError(f"--for-preset must name the measured preset, one of {', '.join(presets)}")
        fpt = flops[for_preset]["per_token_full"]
        sources[for_preset] = (tokens_per_s, tokens_per_s * fpt / 1e12, fpt, f"{for_preset} (given)")
    if not sources and tflops_per_gpu is None:
        raise ValueError("give --results, --tokens-per-s-per-gpu with --for-preset, or --tflops-per-gpu")
    rows = []
    for preset in presets:
        f = flops[preset]
        if preset in sources:
            tps, tflops, _, label = sources[preset]
            basis = f"measured: {label}"
        elif tflops_per_gpu is not None:
            tflops = tflops_per_gpu
            tps = tflops * 1e12 / f["per_token_full"]
            basis = f"projected at the given {tflops:g} TFLOP/s per GPU"
        else:
            near = min(sources, key=lambda k: abs(math.log(sources[k][2] / f["per_token_full"])))
            tflops = sources[near][1]
            tps = tflops * 1e12 / f["per_token_full"]
            basis = f"projected at {sources[near][3]}'s {tflops:.4g} TFLOP/s per GPU (same MFU)"
        hours = gpu_hours(tokens, tps)
        rows.append({"preset": preset, "basis": basis, "tokens_per_s_per_gpu": tps,
                     "model_tflops_per_gpu": tflops, "gpu_hours": hours,
                     "days": wall_days(hours, gpus), "flops_full": f["full"],
                     "flops_causal": f["causal"], "flops_six_nd": f["six_nd"]})
    four = preset_flops("soda-4b", SODA_TOKENS)  # SODA's figure is for 500B tokens
    return {
        "gpus": gpus, "tokens": tokens, "rows": rows,
        "results": None if results is None else {
            k: results[k] for k in ("path", "smoke", "device", "commit")},
        "meaningless_for_gpu_planning": bool(results and results["smoke"]),
        "soda_4b": {"reported_flops": SODA_4B_REPORTED_FLOPS, "tokens": SODA_TOKENS,
                    "exact_full": four["full"], "exact_causal": four["causal"],
                    "six_nd": four["six_nd"]},
    }


def format_projection(proj: dict) -> str:
    lines = []
    if proj["meaningless_for_gpu_planning"]:
        lines += [SMOKE_BANNER, ""]
    src = proj["results"]
    if src:
        dev = src["device"]
        lines.append(f"throughput from {src['path']} ({dev.get('kind')}: {dev.get('name')}, "
                     f"commit {src['commit']})")
    lines += [f"cost of {proj['tokens']:.3g} tokens per preset on {proj['gpus']} GPUs "
              "(per-GPU rate assumed to hold at that scale)", "",
              f"{'preset':<11}{'tokens/s/GPU':>14}{'TFLOP/s/GPU':>13}{'GPU-hours':>14}{'days':>10}"
              f"{'FLOPs full':>12}{'causal':>10}{'6ND':>10}  basis"]
    for r in proj["rows"]:
        lines.append(f"{r['preset']:<11}{r['tokens_per_s_per_gpu']:>14,.0f}"
                     f"{r['model_tflops_per_gpu']:>13.4g}"
                     f"{r['gpu_hours']:>14,.0f}{r['days']:>10,.1f}{r['flops_full']:>12.3e}"
                     f"{r['flops_causal']:>10.3e}{r['flops_six_nd']:>10.3e}  {r['basis']}")
    four = proj["soda_4b"]
    lines += ["", f"SODA reports ~{four['reported_flops']:.2g} FLOPs for the 4B run (500B tokens); "
              f"the exact count here: {four['exact_full']:.3e} with full attention "
              f"({four['exact_full'] / four['reported_flops']:.2f}x), {four['exact_causal']:.3e} "
              f"causal ({four['exact_causal'] / four['reported_flops']:.2f}x); 6ND "
              f"{four['six_nd']:.3e} ({four['six_nd'] / four['reported_flops']:.2f}x)."]
    if proj["meaningless_for_gpu_planning"]:
        lines += ["", SMOKE_BANNER]
    return "\n".join(lines)
