"""``soda-mega export hf CKPT OUT``: a checkpoint as a HuggingFace Qwen3 folder (see :mod:`soda_mega.hf`)."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
OUT holds config.json (Qwen3ForCausalLM; vocab_size = the real vocabulary, TP padding rows
dropped; a "soda_mega" block with the vocabulary layout and the source checkpoint),
generation_config.json, model.safetensors (or model-0000i-of-0000n.safetensors shards and
model.safetensors.index.json beyond --max-shard-size) and tokenizer.json,
tokenizer_config.json, special_tokens_map.json. The tokenizer spells every id: the run's text
tokenizer (data.tokenizer, or an equivalent of the byte-level fallback), the special tokens
(<|text_start|> ...) and one token per audio id, <|audio_k_x|> for code x of codebook k.
tok(text) starts with BOS like the training documents; EOS pads (on the left). Loads offline
with transformers:
  model = AutoModelForCausalLM.from_pretrained(OUT); tok = AutoTokenizer.from_pretrained(OUT)
  model.generate(**tok(["prompt 1", "prompt 2"], padding=True, return_tensors="pt"))
"""


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a checkpoint to another format (hf: HuggingFace Qwen3)",
                       description="Export a soda-mega checkpoint. `soda-mega export hf --help` explains.")
    formats = p.add_subparsers(dest="export_format", metavar="FORMAT")
    formats.required = True
    hf = formats.add_parser(
        "hf", help="HuggingFace Qwen3ForCausalLM folder (safetensors, config, tokenizer)",
        description="Write a checkpoint (a step_N folder, a checkpoints/ folder or a run folder; "
                    "any TP/PP layout) as a HuggingFace Qwen3ForCausalLM folder that transformers "
                    "loads offline. OUT is written as OUT.tmp-<pid> and renamed when complete.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    hf.add_argument("checkpoint", metavar="CKPT", help="checkpoint: step_N, checkpoints/ or run folder")
    hf.add_argument("out", metavar="OUT", help="output folder (new or empty unless --overwrite)")
    hf.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="weight dtype in the safetensors files (default bf16)")
    hf.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                    help="split the weights into shards of at most SIZE (5GB, 500MB, 2GiB; default 5GB)")
    hf.add_argument("--tokenizer", metavar="PATH",
                    help="the run's text tokenizer.json, when the checkpoint's data.tokenizer path "
                         "is not readable on this machine")
    hf.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    return p


def run(args) -> int:
    from soda_mega.checkpoint.errors import CheckpointError
    from soda_mega.hf.export import export_hf
    from soda_mega.hf.files import HFError

    if args.overrides:
        print(f"soda-mega export hf: config overrides do not apply to an export: {' '.join(args.overrides)}",
              file=sys.stderr)
        return 2
    try:
        export_hf(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                  overwrite=args.overwrite, tokenizer=args.tokenizer)
    except (HFError, CheckpointError) as err:
        print(f"soda-mega export hf: {err}", file=sys.stderr)
        return 2
    return 0
