"""Arguments and output shared by the generation-based ``soda-mega eval`` tasks and ``s2st``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from soda_mega.data.write.writer import atomic_write_text
from soda_mega.utils.provenance import write_json

CKPT_HELP = "checkpoint: a step_N folder, a checkpoints/ folder or a run folder (any TP/PP layout)"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    p.add_argument("--mimi-weights", metavar="PATH",
                   help="local Mimi weights (.safetensors); required when the checkpoint's "
                        "data.mimi_weights is set (that path is printed, never loaded unasked); "
                        "without it and without data.mimi_weights: the seeded random Mimi, "
                        "announced")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="local HF tokenizer.json (default: the checkpoint's data.tokenizer)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the model and codec run (auto = cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="model weights dtype (auto = bf16 on cuda, fp32 on cpu)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences per forward batch")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR",
                   help="write report.json, report.md and items.jsonl (and WAVs) into DIR")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out manifest items with missing/unreadable audio (named and counted "
                        "in the report) instead of stopping")


def load(args):
    """(decoder, SpeechIO) for the checkpoint and device arguments."""
    from soda_mega.checkpoint.layout import checkpoint_config, resolve_checkpoint
    from soda_mega.checkpoint.weights import load_full_weights
    from soda_mega.eval.speech_io import SpeechIO
    from soda_mega.inference.decoder import SodaDecoder

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
    path = resolve_checkpoint(args.checkpoint)
    # The codec and tokenizer are checked first: a refusal comes before the model is loaded.
    speech = SpeechIO(checkpoint_config(path), args.mimi_weights, args.tokenizer, device=device,
                      source=f"checkpoint {path}")
    print(f"[soda-mega eval] loading {path}", file=sys.stderr, flush=True)
    cfg, full = load_full_weights(path)
    decoder = SodaDecoder(cfg, full, device, dtype).eval()
    return decoder, speech, path


def emit(args, task: str, summary: dict, items: list[dict], markdown: str, extra: dict) -> None:
    """Print the summary; with ``--out``, write the report files atomically."""
    report = {"task": task, **extra, "summary": summary}
    if args.out:
        out = Path(args.out)
        write_json(out / "report.json", report)
        atomic_write_text(out / "items.jsonl", "".join(json.dumps(i) + "\n" for i in items))
        atomic_write_text(out / "report.md", markdown)
        print(f"[soda-mega eval] wrote {out}/report.json, report.md, items.jsonl", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(markdown)
