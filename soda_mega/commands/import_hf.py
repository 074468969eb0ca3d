"""``soda-mega import hf DIR OUT``: a HuggingFace Qwen3 folder as a soda-mega checkpoint (see :mod:`soda_mega.hf`)."""

from __future__ import annotations

import argparse
import sys

from soda_mega.commands.argtypes import positive_int
from soda_mega.config import preset_names

EPILOG = """\
DIR needs config.json (model_type qwen3, Qwen3ForCausalLM) and safetensors weights
(model.safetensors, or shards with model.safetensors.index.json). The vocabulary layout comes
from the "soda_mega" block that `soda-mega export hf` writes into config.json, else from the
<|text_start|> ... and <|audio_k_x|> tokens of tokenizer.json, else SODA's default 144,644-id
layout when vocab_size holds it; the command says which. Tied embeddings are untied by copy.

OUT gets step_00000000/ (weights only, fp32: evaluate, export, or start a run from it),
config.yaml (preset or defaults, with the model and vocabulary of DIR, training.init_from=OUT;
data.tokenizer points at OUT/text_tokenizer.json, the text range of DIR's tokenizer, unless
DIR came from a byte-level run) and text_tokenizer.json. Then:
  soda-mega train --config OUT/config.yaml --data.train=... --run.dir=...
Extra --section.key=value overrides go into config.yaml (model shape and vocab.* are fixed by DIR).
"""


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("import", help="import a model from another format (hf: HuggingFace Qwen3)",
                       description="Import a model as a soda-mega checkpoint. "
                                   "`soda-mega import hf --help` explains.")
    formats = p.add_subparsers(dest="import_format", metavar="FORMAT")
    formats.required = True
    hf = formats.add_parser(
        "hf", help="HuggingFace Qwen3ForCausalLM folder -> weights-only soda-mega checkpoint",
        description="Convert a local HuggingFace Qwen3ForCausalLM folder (nothing is downloaded) "
                    "into a weights-only soda-mega checkpoint and a training config.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    hf.add_argument("folder", metavar="DIR", help="HuggingFace model folder")
    hf.add_argument("out", metavar="OUT", help="output folder (must be new or empty)")
    hf.add_argument("--preset", metavar="NAME", choices=preset_names(),
                    help=f"check the model's shape against this preset and start config.yaml from it "
                         f"({', '.join(preset_names())})")
    hf.add_argument("--seq-length", type=positive_int, metavar="N",
                    help="model.seq_length of the config (default: max_position_embeddings)")
    return p


def run(args) -> int:
    from soda_mega.checkpoint.errors import CheckpointError
    from soda_mega.hf.files import HFError
    from soda_mega.hf.importer import import_hf

    try:
        import_hf(args.folder, args.out, preset=args.preset, seq_length=args.seq_length,
                  overrides=args.overrides)
    except (HFError, CheckpointError) as err:
        print(f"soda-mega import hf: {err}", file=sys.stderr)
        return 2
    return 0
