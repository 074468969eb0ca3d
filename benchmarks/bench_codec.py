"""Mimi throughput of ``soda-mega data build`` (issue 17, item 3), GPU side and CPU side apart.

* **Codec** (the device): seconds of audio encoded per second of wall time, for each batch
  size x streaming chunk length, with padded batches of equal clips through the same
  ``MimiCodec._encode_padded`` path the build uses. Real-size Mimi: random-init weights cost the
  same as trained ones (``--mimi-weights`` to use a file anyway). On a node with several GPUs
  the best setting is also run on every GPU at once (one codec per GPU, one thread each), which
  gives the node's rate as measured, not multiplied.
* **CPU side** (one process, one torch thread, as a build's feeder runs): decoding WAV files
  and resampling them to Mimi's 24 kHz, measured separately, so the bottleneck is visible: a
  GPU needs ``codec rate / feeder rate`` feeder processes.

    python benchmarks/bench_codec.py                 # on a GPU: the full grid, benchmarks/results/
    python benchmarks/bench_codec.py --smoke         # seconds on CPU; for the test suite

Writes ``bench_codec_<device>[_smoke].json`` (stamped with device, versions, commit) and a
markdown table beside it. ``soda-mega data plan --bench FILE --hours H --gpus G`` turns the
JSON into the wall time and GPU-hours of a build. The GPU campaign calls :func:`run`.
Target (issue 17): >= 2,000 s of audio per second per H200 (then 1.1M hours take < 1 day on 32).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_AUDIO_S_PER_S_PER_GPU = 2000.0

# chunk 10 s (the build's default) first: with a time budget, the most useful rows come first
FULL = {"batch_sizes": (1, 8, 32, 64, 128), "chunk_seconds": (10.0, 2.0, 30.0), "clip_seconds": 30.0,
        "repeats": 3, "cpu_files": 8, "source_rates": (16000, 44100)}
FULL_CPU = {"batch_sizes": (1,), "chunk_seconds": (2.0, 10.0), "clip_seconds": 10.0,
            "repeats": 1, "cpu_files": 4, "source_rates": (16000, 44100)}
SMOKE = {"batch_sizes": (1, 2), "chunk_seconds": (0.8,), "clip_seconds": 0.8,
         "repeats": 1, "cpu_files": 2, "source_rates": (16000,)}


def _clip(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Speech-like test audio: noise bursts and a glide (the codec's cost does not depend on it)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.1 * rng.standard_normal(t.size) * (np.sin(3 * t) > 0)
            + 0.3 * np.sin(2 * np.pi * (150 + 40 * t) * t)).astype(np.float32)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_encode(codec, batch_size: int, chunk_seconds: float, clip_seconds: float,
                   repeats: int) -> dict:
    """One padded batch of ``batch_size`` equal clips, encoded ``repeats`` times after a warm-up."""
    import torch

    codec.configure(chunk_seconds, batch_size)
    rate = codec.sample_rate
    clips = [_clip(clip_seconds, rate, seed=i) for i in range(batch_size)]
    if codec.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(codec.device)
    codec._encode_padded(clips)  # warm-up (kernels, allocator)
    _sync(codec.device)
    start = time.perf_counter()
    for _ in range(repeats):
        codes = codec._encode_padded(clips)
    _sync(codec.device)
    seconds = (time.perf_counter() - start) / repeats
    row = {"batch_size": batch_size, "chunk_seconds": chunk_seconds, "clip_seconds": clip_seconds,
           "seconds_per_batch": seconds, "audio_s_per_s": batch_size * clip_seconds / seconds,
           "frames": int(codes[0].shape[-1])}
    if codec.device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(codec.device) / 2**30
    return row


def measure_all_gpus(codecs: list, best: dict, repeats: int) -> dict:
    """The best setting on every GPU at once, one codec and one thread per GPU: the node's rate."""
    results: list[dict | BaseException] = [None] * len(codecs)  # type: ignore[list-item]

    def work(i: int) -> None:
        import torch

        try:
            torch.cuda.set_device(codecs[i].device)  # the current device is per thread
            results[i] = measure_encode(codecs[i], best["batch_size"], best["chunk_seconds"],
                                        best["clip_seconds"], repeats)
        except BaseException as err:  # noqa: BLE001 - reported in the result
            results[i] = err

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(codecs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    if errors:
        return {"gpus": len(codecs), "error": errors[0]}
    return {"gpus": len(codecs), "per_gpu_audio_s_per_s": [r["audio_s_per_s"] for r in results],
            "node_audio_s_per_s": sum(r["audio_s_per_s"] for r in results), "wall_seconds": wall}


def measure_cpu_side(files: int, seconds: float, source_rates: tuple[int, ...]) -> list[dict]:
    """Decode WAV files and resample to 24 kHz in this process with one torch thread (a feeder)."""
    import torch

    from soda_mega.data.codec import MIMI_SAMPLE_RATE, to_mono
    from soda_mega.data.write.build_worker import decode_for_codec
    from soda_mega.data.write.inputs import read_audio

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_codec_") as tmp:
            for rate in source_rates:
                paths = []
                for i in range(files):
                    path = Path(tmp) / f"{rate}_{i}.wav"
                    _write_wav(path, _clip(seconds, rate, seed=i), rate)
                    paths.append(str(path))
                decode_for_codec(paths[0])  # warm-up (resampling kernel cache)
                t0 = time.perf_counter()
                decoded = [read_audio(p) for p in paths]
                t_decode = time.perf_counter() - t0
                t0 = time.perf_counter()
                for wav, r in decoded:
                    to_mono(wav, r, MIMI_SAMPLE_RATE)
                t_resample = time.perf_counter() - t0
                t0 = time.perf_counter()
                for p in paths:
                    decode_for_codec(p)
                t_both = time.perf_counter() - t0
                audio = files * seconds
                rows.append({"source_rate": rate, "files": files, "clip_seconds": seconds,
                             "decode_audio_s_per_s": audio / t_decode,
                             "resample_audio_s_per_s": audio / t_resample if rate != MIMI_SAMPLE_RATE else None,
                             "decode_resample_audio_s_per_s": audio / t_both})
    finally:
        torch.set_num_threads(threads)
    return rows


def _write_wav(path: Path, wav: np.ndarray, rate: int) -> None:
    import struct

    data = (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def run(smoke: bool, out_dir: str | Path = RESULTS, *, device: str = "auto", mimi_weights: str | None = None,
        num_codebooks: int = 8, grid: dict | None = None, budget_s: float | None = None) -> dict:
    """Measure and write ``bench_codec_<device>[_smoke].json`` under ``out_dir``; returns the payload
    (``payload["rates"]`` is what ``soda-mega data plan`` reads). The GPU campaign's phase.

    ``budget_s``: encode settings not started within this many seconds are listed as skipped
    (the CPU side and the all-GPU run still happen)."""
    import torch

    from soda_mega.data.codec import resolve_device

    dev = resolve_device(device)
    grid = dict(grid or (SMOKE if smoke else FULL if dev.type == "cuda" else FULL_CPU))
    threads = torch.get_num_threads()
    if smoke:
        torch.set_num_threads(1)  # a shared CI core: threads only add spin-waiting
    try:
        return _run(smoke, Path(out_dir), dev, mimi_weights, num_codebooks, grid, budget_s)
    finally:
        torch.set_num_threads(threads)


def _run(smoke: bool, out_dir: Path, dev, mimi_weights: str | None, num_codebooks: int, grid: dict,
         budget_s: float | None) -> dict:
    import torch

    from soda_mega.data.codec import MimiCodec
    from soda_mega.utils.provenance import write_json

    t_start = time.perf_counter()
    codec = MimiCodec(mimi_weights, num_codebooks, device=str(dev), warn=False)
    rows = []
    for chunk in grid["chunk_seconds"]:
        for bs in grid["batch_sizes"]:
            if budget_s is not None and time.perf_counter() - t_start > budget_s:
                rows.append({"batch_size": bs, "chunk_seconds": chunk, "clip_seconds": grid["clip_seconds"],
                             "skipped": f"time budget of {budget_s:.0f} s spent"})
                continue
            try:
                rows.append(measure_encode(codec, bs, chunk, grid["clip_seconds"], grid["repeats"]))
            except torch.cuda.OutOfMemoryError as err:
                rows.append({"batch_size": bs, "chunk_seconds": chunk, "clip_seconds": grid["clip_seconds"],
                             "error": f"out of memory: {str(err).splitlines()[0]}"})
                torch.cuda.empty_cache()
    ok = [r for r in rows if "audio_s_per_s" in r]
    best = max(ok, key=lambda r: r["audio_s_per_s"]) if ok else None
    node = None
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    if best is not None and dev.type == "cuda" and gpus > 1 and not smoke:
        codecs = [codec] + [MimiCodec(mimi_weights, num_codebooks, device=f"cuda:{i}", warn=False)
                            for i in range(1, gpus)]
        node = measure_all_gpus(codecs, best, grid["repeats"])
    cpu_rows = measure_cpu_side(grid["cpu_files"], grid["clip_seconds"], tuple(grid["source_rates"]))
    feeder_rate = min(r["decode_resample_audio_s_per_s"] for r in cpu_rows)
    rates = {"device": dev.type, "smoke": smoke, "num_codebooks": num_codebooks,
             "codec_audio_s_per_s_per_device": best["audio_s_per_s"] if best else None,
             "best_setting": {k: best[k] for k in ("batch_size", "chunk_seconds")} if best else None,
             "feeder_audio_s_per_s_per_process": feeder_rate,
             "node_audio_s_per_s": node.get("node_audio_s_per_s") if node else None,
             "node_gpus": node["gpus"] if node else None}
    if best and feeder_rate:
        rates["feeders_needed_per_device"] = best["audio_s_per_s"] / feeder_rate
    payload = {"smoke": smoke, "device": str(dev), "gpus_visible": gpus, "grid": grid,
               "mimi": {"weights": mimi_weights, "random_init": mimi_weights is None,
                        "num_codebooks": num_codebooks},
               "encode": rows, "best": best, "all_gpus": node, "cpu_side": cpu_rows, "rates": rates,
               "seconds": time.perf_counter() - t_start}
    if dev.type == "cuda" and best:
        payload["target"] = {"audio_s_per_s_per_gpu": TARGET_AUDIO_S_PER_S_PER_GPU,
                             "met": best["audio_s_per_s"] >= TARGET_AUDIO_S_PER_S_PER_GPU}
    stem = f"bench_codec_{dev.type}{'_smoke' if smoke else ''}"
    path = write_json(out_dir / f"{stem}.json", payload)
    (out_dir / f"{stem}.md").write_text(markdown(payload))
    payload["path"] = str(path)
    return payload


def markdown(payload: dict) -> str:
    r = payload["rates"]
    lines = [f"# bench_codec ({'smoke, ' if payload['smoke'] else ''}{payload['device']}, "
             f"Mimi {'random init' if payload['mimi']['random_init'] else 'weights'}, "
             f"{payload['mimi']['num_codebooks']} codebooks)", "",
             "| batch | chunk s | clip s | s/batch | audio s/s |", "|---:|---:|---:|---:|---:|"]
    for row in payload["encode"]:
        if "error" in row or "skipped" in row:
            lines.append(f"| {row['batch_size']} | {row['chunk_seconds']} | {row['clip_seconds']} | "
                         f"{row.get('error') or 'skipped: ' + row['skipped']} | |")
        else:
            lines.append(f"| {row['batch_size']} | {row['chunk_seconds']} | {row['clip_seconds']} | "
                         f"{row['seconds_per_batch']:.4f} | {row['audio_s_per_s']:.1f} |")
    lines += ["", "| source Hz | decode s/s | resample s/s | decode+resample s/s (1 process) |",
              "|---:|---:|---:|---:|"]
    for row in payload["cpu_side"]:
        res = f"{row['resample_audio_s_per_s']:.1f}" if row["resample_audio_s_per_s"] else "-"
        lines.append(f"| {row['source_rate']} | {row['decode_audio_s_per_s']:.1f} | {res} | "
                     f"{row['decode_resample_audio_s_per_s']:.1f} |")
    codec_rate = r["codec_audio_s_per_s_per_device"]
    lines += ["", f"codec: {codec_rate or 0:.1f} audio s/s per {r['device']} device (best {r['best_setting']}); "
                  f"one feeder process: {r['feeder_audio_s_per_s_per_process']:.1f} audio s/s; feeders "
                  f"needed per device: {r.get('feeders_needed_per_device', 0):.2f}"]
    if payload.get("all_gpus"):
        lines.append(f"all {payload['all_gpus'].get('gpus')} GPUs at once: {payload['all_gpus']}")
    if payload.get("target"):
        t = payload["target"]
        lines.append(f"target >= {t['audio_s_per_s_per_gpu']:.0f} audio s/s per GPU: "
                     f"{'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny grid, seconds on CPU (the test suite)")
    p.add_argument("--out-dir", default=str(RESULTS), help="where the JSON and markdown go")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--mimi-weights", metavar="PATH", help="local Mimi weights (default: random init, same cost)")
    p.add_argument("--num-codebooks", type=int, default=8, help="codebooks kept (vocab.num_codebooks)")
    p.add_argument("--batch-sizes", help="comma-separated batch sizes (overrides the grid)")
    p.add_argument("--chunk-seconds", help="comma-separated streaming chunk lengths (overrides the grid)")
    p.add_argument("--clip-seconds", type=float, help="length of each clip (overrides the grid)")
    p.add_argument("--budget-s", type=float, help="skip the encode settings not started within this time")
    args = p.parse_args(argv)
    grid = None
    if args.batch_sizes or args.chunk_seconds or args.clip_seconds:
        from soda_mega.data.codec import resolve_device

        dev = resolve_device(args.device)
        grid = dict(SMOKE if args.smoke else FULL if dev.type == "cuda" else FULL_CPU)
        if args.batch_sizes:
            grid["batch_sizes"] = tuple(int(x) for x in args.batch_sizes.split(","))
        if args.chunk_seconds:
            grid["chunk_seconds"] = tuple(float(x) for x in args.chunk_seconds.split(","))
        if args.clip_seconds:
            grid["clip_seconds"] = args.clip_seconds
    payload = run(args.smoke, args.out_dir, device=args.device, mimi_weights=args.mimi_weights,
                  num_codebooks=args.num_codebooks, grid=grid, budget_s=args.budget_s)
    print(markdown(payload))
    print(f"wrote {payload['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
