"""Loader throughput vs. what a training run consumes (issue 3, item 9).

Measures tokens/s of :class:`soda_mega.data.loader.SodaDataLoader` (packing, mixing, reading
MDS shards, assembling micro-batches, with loader worker processes), and sets it next to the
tokens/s one GPU of a ``--preset`` run consumes::

    consumed tokens/s per GPU = peak FLOP/s x assumed MFU / training FLOPs per token

using the exact FLOPs per token of ``soda-mega model``. The peak and MFU are stated inputs
(defaults: H100 SXM dense bf16 989 TFLOP/s at 50% MFU), not measurements. Target: >= 10x
headroom. Without ``--dataset`` a synthetic corpus of SODA-like documents (10-40 s speech
documents of 8 codebooks + 5% text) is written first, so the numbers include real MDS reads.

    python benchmarks/bench_data.py                 # full run, writes benchmarks/results/
    python benchmarks/bench_data.py --smoke         # seconds; shapes tiny; for the test suite
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from soda_mega.config import load_config
from soda_mega.data.loader import SodaDataLoader
from soda_mega.data.synthetic import write_split
from soda_mega.model.accounting import flops_per_token
from soda_mega.tokens import VocabLayout
from soda_mega.utils.provenance import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def synth_corpus(root: Path, layout: VocabLayout, speech_docs: int, text_docs: int,
                 frames: tuple[int, int], seed: int = 0) -> list[str]:
    """Write one speech and one text dataset of random SODA-shaped documents."""
    rng = np.random.default_rng(seed)
    speech = []
    for _ in range(speech_docs):
        n = int(rng.integers(*frames)) * layout.num_codebooks
        body = layout.audio_base + rng.integers(0, layout.codebook_size * layout.num_codebooks, n)
        speech.append(np.concatenate([[layout.bos_id, layout.audio_start], body,
                                      [layout.audio_end, layout.eos_id]]).astype(np.int32))
    text = [np.concatenate([[layout.bos_id], rng.integers(0, min(256, layout.text_vocab_size),
                                                           int(rng.integers(200, 2000))),
                            [layout.eos_id]]).astype(np.int32) for _ in range(text_docs)]
    write_split(root / "speech" / "train", layout, speech, "speech", size_limit=1 << 26)
    write_split(root / "text" / "train", layout, text, "text", size_limit=1 << 26)
    return [str(root / "speech"), str(root / "text")]


def measure_plan(cfg, windows: int) -> dict:
    """Planning alone (lengths only): every DP rank plans all windows, so this bounds the DP size."""
    plan = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=False).plan.clone()
    start = time.perf_counter()
    for _ in range(windows):
        plan.next_window()
    seconds = time.perf_counter() - start
    tokens = windows * (cfg.model.seq_length)
    return {"windows": windows, "seconds": seconds, "tokens_per_s": tokens / seconds}


def measure(cfg, batches: int, warmup: int) -> dict:
    loader = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True)
    it = iter(loader)
    for _ in itertools.islice(it, warmup):
        pass
    start = time.perf_counter()
    tokens = 0
    for batch in itertools.islice(it, batches):
        tokens += batch["tokens"].numel()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", action="append", default=[], help="built dataset root (repeatable); default: synthetic")
    p.add_argument("--preset", default="soda-1.7b", help="model whose consumption is the yardstick")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--batches", type=int, default=200, help="timed micro-batches")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="stated GPU peak (H100 SXM dense bf16)")
    p.add_argument("--mfu", type=float, default=0.5, help="stated model FLOPs utilisation")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_data.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few batches (CPU test mode)")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_length, args.micro_batch, args.batches = 256, 2, 10

    yardstick = load_config(preset=args.preset)
    layout = VocabLayout.from_config(yardstick.vocab)
    fpt = flops_per_token(yardstick.model, layout.size, seq_length=args.seq_length).training
    consumed = args.peak_tflops * 1e12 * args.mfu / fpt

    with tempfile.TemporaryDirectory() as tmp:
        datasets = args.dataset
        if not datasets:
            docs = (60, 6) if args.smoke else (1500, 150)
            frames = (50, 100) if args.smoke else (125, 500)
            print(f"[bench_data] writing a synthetic corpus ({docs[0]} speech + {docs[1]} text docs)",
                  file=sys.stderr)
            datasets = synth_corpus(Path(tmp), layout, *docs, frames=frames)
        cfg = load_config(preset=args.preset, overrides=[
            f"--data.train={','.join(datasets)}", f"--model.seq_length={args.seq_length}",
            f"--training.micro_batch_size={args.micro_batch}",
            f"--training.global_batch_size={args.micro_batch}", f"--data.num_workers={args.workers}"])
        result = measure(cfg, args.batches, warmup=2 if args.smoke else 10)
        planning = measure_plan(cfg, 200 if args.smoke else 20000)

    headroom = result["tokens_per_s"] / consumed
    payload = {
        "benchmark": "data_loader",
        "smoke": args.smoke,
        "settings": {"seq_length": args.seq_length, "micro_batch": args.micro_batch,
                     "workers": args.workers, "datasets": args.dataset or "synthetic"},
        "loader": result,
        "yardstick": {"preset": args.preset, "training_flops_per_token": fpt,
                      "stated_peak_tflops": args.peak_tflops, "stated_mfu": args.mfu,
                      "consumed_tokens_per_s_per_gpu": consumed},
        "headroom": headroom,
        "planning": planning,
        # Each DP rank plans every window of the global batch: planning tokens/s divided by
        # the per-GPU consumption is the largest DP size before planning becomes the bottleneck.
        "max_dp_before_planning_bound": planning["tokens_per_s"] / consumed,
    }
    write_json(args.out, payload)
    print(f"loader {result['tokens_per_s']:,.0f} tokens/s with {args.workers} workers; "
          f"{args.preset} consumes {consumed:,.0f} tokens/s per GPU "
          f"(stated {args.peak_tflops:g} TFLOP/s x {args.mfu:.0%} MFU) -> headroom {headroom:.1f}x "
          f"({'meets' if headroom >= 10 else 'BELOW'} the 10x target); planning alone "
          f"{planning['tokens_per_s']:,.0f} tokens/s -> fine up to DP "
          f"{planning['tokens_per_s'] / consumed:,.0f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
