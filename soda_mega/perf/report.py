"""Markdown table and plot of a throughput result (``bench_throughput_*.json``)."""

from __future__ import annotations

from pathlib import Path


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _num(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def is_gpu_result(payload: dict) -> bool:
    """True only for a full (non-smoke) run stamped on a CUDA device."""
    return payload["provenance"]["device"]["kind"] == "cuda" and not payload.get("smoke")


def markdown(payload: dict) -> str:
    prov = payload["provenance"]
    dev = prov["device"]
    gemm = payload["matmul_peak"]
    lines = [f"# bench_throughput ({'smoke, ' if payload['smoke'] else ''}{dev['kind']}: {dev['name']})",
             "",
             f"commit `{prov['commit']}`, {prov['time_utc']}, torch {prov['versions'].get('torch')}, "
             f"megatron-core {prov['versions'].get('megatron-core')}, "
             f"triton {prov['versions'].get('triton')}"
             + (f", driver {dev.get('driver')}" if dev["kind"] == "cuda" else ""),
             ""]
    if not is_gpu_result(payload):
        lines += ["**CPU smoke run: these numbers show that the benchmark works, nothing about GPU "
                  "throughput. Never quote them as GPU figures.**", ""]
    lines += [f"Measured matmul peak: **{gemm['tflops']:.3f} TFLOP/s** ({gemm['label']}; "
              f"spread {gemm['tflops_min']:.3f}-{gemm['tflops_max']:.3f}).",
              f"Spec peak: {payload['spec_peak_tflops'] or 'n/a'} TFLOP/s. Model FLOPs are exact "
              "(full attention; causal in the JSON), recomputation not counted.", ""]
    lines += ["| case | variant | loss / emb / attn | mb x accum x seq | recompute | step s (median, "
              "spread) | tokens/s/GPU | TFLOP/s/GPU | MFU spec | MFU measured GEMM | mem GiB pred / "
              "meas | GPU util % | power W |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        k, s = r["kernels"], r["settings"]
        shape = f"{s['micro_batch_size']} x {s['micro_batches_per_step']} x {s['seq_length']}"
        head = f"| {r['case']} | {r['variant']} | {k['loss']} / {k['embedding']} / {k['attention']} | " \
               f"{shape} | {s['recompute']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r['reason'][:120]} | | | | | | | |")
            continue
        mem = r.get("memory", {})
        tel = r.get("telemetry") or {}
        lines.append(
            f"{head} {r['step_seconds_median']:.3f} ({r['step_seconds_spread']:.0%}) | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | {r['model_tflops_per_gpu']:.3f} | "
            f"{_pct(r['mfu_vs_spec_peak'])} | {_pct(r['mfu_vs_measured_gemm'])} | "
            f"{_num(mem.get('predicted_allocated_gib'), '.2f')} / "
            f"{_num(mem.get('measured_peak_allocated_gib'), '.2f') or 'n/a'} | "
            f"{_num(tel.get('gpu_util'), '.0f') or 'n/a'} | "
            f"{_num(tel.get('gpu_power_w'), '.0f') or 'n/a'} |")
    comps = [c for c in payload["comparisons"] if len(c) > 1]
    if comps:
        lines += ["", "Ratios (tokens/s, same run):", ""]
        for c in comps:
            parts = []
            for key, value in c.items():
                if key == "case":
                    continue
                if isinstance(value, dict):
                    base = key.replace("speedup_vs_", "")
                    parts += [f"{v} {x:.2f}x {base}" for v, x in value.items() if v != base]
                else:
                    parts.append(f"{key} {value:.2f}x")
            lines.append(f"- {c['case']}: " + "; ".join(parts))
    notes = sorted({f"{r['case']}: {n}" for r in payload["rows"] for n in r.get("notes", [])})
    if payload.get("telemetry_notice"):
        notes.append(payload["telemetry_notice"])
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> str:
    """Bar charts of tokens/s per GPU and MFU (vs the measured GEMM peak); returns a note."""
    from soda_mega.utils.plotting import NOT_INSTALLED, pyplot

    plt = pyplot()
    if plt is None:
        return NOT_INSTALLED
    rows = [r for r in payload["rows"] if r["status"] == "ok"]
    if not rows:
        return "no successful case: no plot written"
    cases = list(dict.fromkeys(r["case"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, label in ((axes[0], "tokens_per_s_per_gpu", "tokens/s per GPU"),
                           (axes[1], "mfu_vs_measured_gemm", "MFU vs measured GEMM peak")):
        for i, variant in enumerate(variants):
            values = [next((r[key] for r in rows if r["case"] == c and r["variant"] == variant), 0.0)
                      for c in cases]
            ax.bar([x + i * width for x in range(len(cases))], values, width=width, label=variant)
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(cases))], cases)
        ax.set_ylabel(label)
        if key == "tokens_per_s_per_gpu":
            ax.set_yscale("log")  # presets differ by orders of magnitude
        ax.legend(fontsize=7)
    dev = payload["provenance"]["device"]
    title = f"bench_throughput on {dev['name']} ({payload['provenance']['commit'][:12]})"
    if not is_gpu_result(payload):
        title += ": CPU SMOKE RUN, not a GPU figure"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
