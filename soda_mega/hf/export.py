"""soda-mega checkpoint (any TP / PP layout) -> HuggingFace ``Qwen3ForCausalLM`` folder.

The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards
with ``model.safetensors.index.json``) and the tokenizer files of
:mod:`soda_mega.hf.tokenizer_files`; ``transformers`` loads it offline with
``AutoModelForCausalLM`` / ``AutoTokenizer``. The weights are the checkpoint's full weights
(gathered by :func:`soda_mega.checkpoint.weights.load_full_weights`) with the TP padding rows of
the embedding and output layer dropped, so ``vocab_size`` is the real vocabulary size and the
logits of every real id are those of the soda-mega model.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from soda_mega.hf.files import HFError, check_output, parse_size, print_listing, staged_output
from soda_mega.hf.hf_config import SODA_BLOCK, export_config, generation_config
from soda_mega.hf.safetensors_io import write_weights
from soda_mega.hf.tokenizer_files import AUDIO_TOKEN_FORMAT, build_tokenizer, write_tokenizer_files
from soda_mega.tokens.layout import VocabLayout

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _log(text: str) -> None:
    print(f"[soda-mega export] {text}", file=sys.stderr, flush=True)


def _version() -> dict:
    from soda_mega import __version__
    from soda_mega.utils.provenance import git_commit

    return {"version": __version__, "commit": git_commit()}


def soda_block(cfg, layout: VocabLayout, step_dir: Path, state: dict, tokenizer_info: dict) -> dict:
    """The ``soda_mega`` entry of ``config.json``: what import needs to rebuild the config."""
    return {
        "vocab_layout": layout.to_dict(),
        "vocab_fingerprint": layout.fingerprint(),
        "audio_token_format": AUDIO_TOKEN_FORMAT,
        "text_tokenizer": tokenizer_info,
        "model": dataclasses.asdict(cfg.model),
        "source_checkpoint": str(step_dir.resolve()),
        "source_step": state.get("step"),
        "source_tokens": state.get("tokens"),
        "soda_mega": _version(),
    }


def trim_vocab(full: dict[str, torch.Tensor], layout: VocabLayout) -> dict[str, torch.Tensor]:
    """``full`` with the embedding and output layer cut to the real ``layout.size`` rows."""
    out = dict(full)
    for name in VOCAB_TENSORS:
        rows = full[name].shape[0]
        if rows < layout.size:
            raise HFError(f"{name} has {rows} rows, fewer than the vocabulary's {layout.size} ids")
        out[name] = full[name][:layout.size]
    return out


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "bf16",
              max_shard_size: str = "5GB", overwrite: bool = False,
              tokenizer: str | Path | None = None) -> Path:
    """Write the HuggingFace folder ``out`` for ``checkpoint``; returns ``out``.

    ``tokenizer`` replaces the checkpoint's ``data.tokenizer`` (a run's tokenizer.json that
    lives elsewhere on this machine).
    """
    from soda_mega.checkpoint.layout import checkpoint_config, checkpoint_state, resolve_checkpoint
    from soda_mega.checkpoint.weights import load_full_weights
    from soda_mega.model.qwen3_mapping import to_hf

    if dtype not in DTYPES:
        raise HFError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    out = Path(out)
    check_output(out, overwrite)
    step_dir = resolve_checkpoint(checkpoint)
    if step_dir.resolve().is_relative_to(out.resolve()):
        raise HFError(f"output {out}: holds the checkpoint {step_dir}; write the export elsewhere")
    cfg, state = checkpoint_config(step_dir), checkpoint_state(step_dir)
    if not cfg.model.qk_norm:
        raise HFError("model.qk_norm is false in this checkpoint; HF Qwen3 always normalises queries "
                      "and keys, so the model has no Qwen3 equivalent")
    layout = VocabLayout.from_config(cfg.vocab)
    text_path = tokenizer if tokenizer is not None else cfg.data.tokenizer
    tok, tok_info = build_tokenizer(layout, text_path)
    _log(f"{step_dir}: step {state.get('step')}, model {cfg.model.name}, {layout.size} ids "
         f"({'byte-level' if tok_info['kind'] == 'byte' else tok_info['source']} text tokenizer)")

    _log("gathering the full weights (any TP / PP layout) ...")
    cfg, full = load_full_weights(step_dir)
    hf = {k: v.to(DTYPES[dtype]).contiguous() for k, v in to_hf(trim_vocab(full, layout), cfg).items()}
    config = export_config(cfg, layout, dtype, soda_block(cfg, layout, step_dir, state, tok_info))

    with staged_output(out, overwrite) as tmp:
        _log(f"writing {len(hf)} tensors ({dtype}) ...")
        write_weights(hf, tmp, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(layout), indent=2) + "\n")
        write_tokenizer_files(tmp, tok, layout, cfg.model.seq_length)
    print_listing(out, f"exported {step_dir} -> {out} (HuggingFace {config['architectures'][0]}, "
                       f"{SODA_BLOCK} block in config.json):")
    return out
