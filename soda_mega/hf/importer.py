"""HuggingFace ``Qwen3ForCausalLM`` folder -> weights-only soda-mega checkpoint.

The output folder ``OUT`` holds ``step_00000000`` (written by
:func:`soda_mega.checkpoint.weights.save_full_weights`, so it loads into any TP / PP layout),
``config.yaml`` (a training configuration that starts from these weights: its
``training.init_from`` is ``OUT``) and, when the model came with a text tokenizer,
``text_tokenizer.json`` (its text range, which ``data.tokenizer`` points at).

Where the vocabulary layout comes from, in order: the ``soda_mega`` block that ``soda-mega
export hf`` writes into ``config.json``; the SODA special and ``<|audio_k_x|>`` tokens of
``tokenizer.json``; SODA's default 144,644-id layout when ``vocab_size`` holds it. The command
says which one it used.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch

from soda_mega.config.fields import ConfigError
from soda_mega.config.loader import apply_mapping, dump_config, load_preset, parse_overrides
from soda_mega.config.schema import SodaConfig
from soda_mega.hf.files import HFError, check_output, file_sha256, print_listing, staged_output
from soda_mega.hf.hf_config import SODA_BLOCK, model_fields, read_config
from soda_mega.hf.safetensors_io import read_weights, weight_shapes
from soda_mega.hf.tokenizer_files import layout_from_tokenizer, text_part
from soda_mega.tokens.layout import VocabLayout

#: Model fields that decide the parameter shapes; ``--preset`` must agree on all of them.
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
                "ffn_hidden_size", "qk_norm")
#: Model fields the weights do not determine, so a command-line override may set them.
FREE_MODEL_FIELDS = ("name", "seq_length", "init_std", "make_vocab_size_divisible_by")
TEXT_TOKENIZER = "text_tokenizer.json"
CONFIG_FILE = "config.yaml"
_IGNORED = (".rotary_emb.inv_freq",)  # buffers some older exports include
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _log(text: str) -> None:
    print(f"[soda-mega import] {text}", file=sys.stderr, flush=True)


def resolve_layout(folder: Path, hf: dict) -> tuple[VocabLayout, str]:
    """(vocabulary layout, where it came from)."""
    block = hf.get(SODA_BLOCK) or {}
    if "vocab_layout" in block:
        try:
            return VocabLayout.from_dict(block["vocab_layout"]), f"the {SODA_BLOCK} block of config.json"
        except (TypeError, ValueError) as err:
            raise HFError(f"{folder}/config.json: {SODA_BLOCK}.vocab_layout is invalid ({err})") from None
    why = "no tokenizer.json"
    tok_path = folder / "tokenizer.json"
    if tok_path.is_file():
        layout, why = layout_from_tokenizer(tok_path, hf.get("bos_token_id"), hf.get("eos_token_id"),
                                            hf["vocab_size"])
        if layout is not None:
            return layout, why
    default = VocabLayout.soda_default()
    if hf["vocab_size"] >= default.size:
        return default, f"SODA's default layout ({default.size} ids; {why})"
    raise HFError(f"{folder}: cannot tell the vocabulary layout: config.json has no {SODA_BLOCK} "
                  f"block, {why}, and vocab_size {hf['vocab_size']} is below SODA's {default.size} ids")


def check_weights(folder: Path, hf: dict, model: dict) -> None:
    """Refuse a ``config.json`` whose shape the weight files do not have, from the safetensors
    headers alone: before a layout, tokenizer, name list or model is built from its numbers."""
    shapes = weight_shapes(folder)

    def expect(name: str, shape: tuple, fields: str) -> None:
        if name not in shapes:
            return  # named later, with the other tensors a Qwen3 needs
        have, file = shapes[name]
        if have != shape:
            raise HFError(f"{folder}/config.json: {fields} give {name} the shape {list(shape)}, "
                          f"but {file} holds {list(have)}")

    h, d = model["hidden_size"], model["head_dim"]
    expect("model.embed_tokens.weight", (hf["vocab_size"], h), "vocab_size and hidden_size")
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    if layers != set(range(model["num_layers"])):
        files = ", ".join(sorted({file for _, file in shapes.values()})[:3])
        raise HFError(f"{folder}/config.json: num_hidden_layers is {model['num_layers']}, but the "
                      f"weights ({files}) hold {len(layers)} layers"
                      + (f" numbered {min(layers)}..{max(layers)}" if layers else ""))
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    expect(f"{attn}.q_proj.weight", (model["num_attention_heads"] * d, h),
           "num_attention_heads, head_dim and hidden_size")
    expect(f"{attn}.k_proj.weight", (model["num_kv_heads"] * d, h),
           "num_key_value_heads, head_dim and hidden_size")
    expect(f"{mlp}.gate_proj.weight", (model["ffn_hidden_size"], h),
           "intermediate_size and hidden_size")


def _fill_defaults(tensors: dict[str, torch.Tensor], hf: dict, m: dict, notes: list[str]) -> dict:
    """Add the tensors transformers makes itself when absent: q/k norms, a tied output layer.

    transformers' Qwen3 normalises queries and keys in every layer and initialises absent norm
    weights to one, so a file without them is a QK-norm model with unit weights (never a model
    without QK-norm: ``model.qk_norm`` is always true for a Qwen3 import).
    """
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED)}
    if "model.embed_tokens.weight" not in tensors:
        raise HFError("weights have no model.embed_tokens.weight; is this a Qwen3ForCausalLM "
                      "state dict (tensor names model.* and lm_head.weight)?")
    keys = [f"model.layers.{i}.self_attn.{n}.weight" for i in range(m["num_layers"])
            for n in ("q_norm", "k_norm")]
    have = sum(k in tensors for k in keys)
    if 0 < have < len(keys):
        raise HFError(f"q_norm / k_norm weights exist for some layers only ({have} of {len(keys)})")
    if not have:
        notes.append("no q_norm / k_norm weights: transformers' Qwen3 normalises queries and keys "
                     "anyway, with unit weights; imported as such")
        tensors.update({k: torch.ones(m["head_dim"]) for k in keys})
    if hf.get("tie_word_embeddings"):
        notes.append("tie_word_embeddings is true: the output layer is untied as a copy of the "
                     "input embedding (soda-mega trains them separately)")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    elif "lm_head.weight" not in tensors:
        raise HFError("weights have no lm_head.weight and config.json does not set tie_word_embeddings")
    return tensors


def _check_preset(preset: str, model: dict) -> dict:
    data = load_preset(preset)
    base = SodaConfig()
    apply_mapping(base, data, f"preset {preset}")
    diffs = [f"model.{k}: {model[k]!r} here, {getattr(base.model, k)!r} in the preset"
             for k in SHAPE_FIELDS if model[k] != getattr(base.model, k)]
    if diffs:
        raise HFError(f"this is a checkpoint of another preset than {preset}: " + "; ".join(diffs))
    return data


def build_config(folder: Path, hf: dict, layout: VocabLayout, model: dict, preset: str | None,
                 seq_length: int | None, overrides: Iterable[str], notes: list[str]) -> SodaConfig:
    """preset (or defaults) < the HF model's shape and vocabulary < command-line overrides."""
    cfg = SodaConfig()
    block_model = (hf.get(SODA_BLOCK) or {}).get("model") or {}
    if preset:
        apply_mapping(cfg, _check_preset(preset, model), f"preset {preset}")
        for k in ("rope_theta", "norm_eps"):
            if model[k] != getattr(cfg.model, k):
                notes.append(f"model.{k}: {model[k]} from config.json replaces the preset's "
                             f"{getattr(cfg.model, k)}")
    else:
        cfg.model.name = block_model.get("name") or f"hf-{folder.name}"
        for k in ("init_std", "make_vocab_size_divisible_by"):
            if k in block_model:
                setattr(cfg.model, k, block_model[k])
    apply_mapping(cfg, {"model": model, "vocab": layout.to_dict()}, f"{folder}/config.json")
    cfg.model.seq_length = seq_length or hf.get("max_position_embeddings") or cfg.model.seq_length
    cli = parse_overrides(overrides)
    fixed = [f"--{s}.{k}" for s, values in cli.items() for k in values
             if s == "vocab" or (s == "model" and k not in FREE_MODEL_FIELDS)]
    if fixed:
        raise HFError(f"{', '.join(fixed)}: set by the HF model's weights and config.json, not "
                      "overridable on import (model.name, model.seq_length, model.init_std and "
                      "model.make_vocab_size_divisible_by are)")
    apply_mapping(cfg, cli, "command line")
    return cfg


def to_full_weights(tensors: dict[str, torch.Tensor], hf: dict, cfg: SodaConfig,
                    layout: VocabLayout, notes: list[str]) -> dict[str, torch.Tensor]:
    """HF tensors -> soda-mega fp32 full weights with the vocabulary padded for TP = 1."""
    from soda_mega.model.qwen3_mapping import from_hf, to_hf

    rows = tensors["model.embed_tokens.weight"].shape[0]
    if rows != hf["vocab_size"]:
        raise HFError(f"model.embed_tokens.weight has {rows} rows but config.json vocab_size is "
                      f"{hf['vocab_size']}")
    if rows < layout.size:
        raise HFError(f"vocab_size {rows} is smaller than the vocabulary layout's {layout.size} ids")
    if rows > layout.size:
        notes.append(f"vocabulary rows {layout.size}..{rows - 1} lie beyond the layout and are dropped "
                     "(padding)")
    try:
        full = from_hf(tensors, cfg)
    except KeyError as err:
        raise HFError(f"weights have no tensor {err.args[0]} that a {cfg.model.num_layers}-layer "
                      "Qwen3 needs") from None
    except RuntimeError as err:
        raise HFError(f"weight shapes do not fit config.json: {err}") from None
    expected = set(to_hf(full, cfg))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise HFError(f"weights hold tensors a Qwen3ForCausalLM does not have: {', '.join(extra[:5])}")
    padded = layout.padded_size(1, cfg.model.make_vocab_size_divisible_by)
    out = {}
    for name, value in full.items():
        value = value.float()
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            value = torch.cat([value[:layout.size], value.new_zeros(padded - layout.size, value.shape[1])])
        out[name] = value.contiguous()
    return out


def _text_tokenizer(folder: Path, hf: dict, layout: VocabLayout, notes: list[str]) -> str | None:
    """The text part of ``folder/tokenizer.json`` for ``data.tokenizer``, or None (byte-level)."""
    kind = ((hf.get(SODA_BLOCK) or {}).get("text_tokenizer") or {}).get("kind")
    path = folder / "tokenizer.json"
    if kind == "byte":
        notes.append("text tokenizer: soda-mega's byte-level tokenizer (data.tokenizer stays unset)")
        return None
    if not path.is_file():
        notes.append("no tokenizer.json: data.tokenizer stays unset (byte-level); set "
                     "--data.tokenizer to the model's text tokenizer before building data")
        return None
    try:
        text = text_part(path, layout)
    except HFError as err:
        notes.append(f"data.tokenizer stays unset: {err}")
        return None
    notes.append(f"text tokenizer: the text range of {path.name}, saved as {TEXT_TOKENIZER} "
                 "(data.tokenizer)")
    return text


def import_hf(folder: str | Path, out: str | Path, preset: str | None = None,
              seq_length: int | None = None, overrides: Iterable[str] = ()) -> Path:
    """Convert the HF folder ``folder`` into the soda-mega checkpoint folder ``out``."""
    from soda_mega import __version__
    from soda_mega.checkpoint.weights import save_full_weights
    from soda_mega.utils.provenance import git_commit

    folder, out = Path(folder), Path(out)
    hf = read_config(folder)
    check_output(out, overwrite=False, overwrite_option=None)
    notes: list[str] = []
    model = {**model_fields(hf), "qk_norm": True}
    check_weights(folder, hf, model)
    layout, layout_from = resolve_layout(folder, hf)
    _log(f"vocabulary layout from {layout_from}: {layout.size} ids (text {layout.text_vocab_size}, "
         f"{len(layout.special_tokens)} special, {layout.num_codebooks} x {layout.codebook_size} audio)")
    try:
        cfg = build_config(folder, hf, layout, model, preset, seq_length, overrides, notes)
        if cfg.training.precision != "fp32":
            notes.append(f"config.yaml trains in training.precision={cfg.training.precision} (from the "
                         "preset or defaults); the checkpoint keeps fp32 weights")
        text_tokenizer = _text_tokenizer(folder, hf, layout, notes)
        cfg.data.tokenizer = str((out / TEXT_TOKENIZER).resolve()) if text_tokenizer else None
        cfg.validate()
    except ConfigError as err:
        raise HFError(f"the imported configuration is invalid: {err}") from None

    _log(f"reading weights of {folder} ...")
    tensors, files = read_weights(folder)
    full = to_full_weights(_fill_defaults(tensors, hf, model, notes), hf, cfg, layout, notes)
    provenance = {
        "source": str(folder.resolve()),
        "weight_files": {p.name: file_sha256(p) for p in files},
        "vocab_layout_from": layout_from,
        "notes": notes,
        "soda_mega": {"version": __version__, "commit": git_commit()},
    }
    with staged_output(out, overwrite=False, overwrite_option=None) as tmp:
        if text_tokenizer:
            (tmp / TEXT_TOKENIZER).write_text(text_tokenizer, encoding="utf-8")
        params = sum(v.numel() for v in full.values())
        _log(f"writing the weights-only checkpoint ({params:,} parameters) ...")
        # NOTE: the checkpoint stores fp32 weights whatever config.yaml trains in: a bf16 model
        # would round fp32 sources, and bf16 sources are exact in fp32.
        save_full_weights(tmp, replace(cfg, training=replace(cfg.training, precision="fp32")),
                          full, provenance)
        # config.yaml starts a run from these weights; the checkpoint's own config does not
        # point at itself.
        run_cfg = replace(cfg, training=replace(cfg.training, init_from=cfg.training.init_from
                                                                   or str(out.resolve())))
        (tmp / CONFIG_FILE).write_text(dump_config(run_cfg))
    for note in notes:
        print(f"note: {note}")
    print_listing(out, f"imported {folder} -> {out} (model {cfg.model.name}, vocabulary from {layout_from}):")
    print(f"train from it (training.init_from={out.resolve()} is set): soda-mega train --config "
          f"{out / CONFIG_FILE} --data.train=... --run.dir=...")
    return out

