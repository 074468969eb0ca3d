"""``config.json`` / ``generation_config.json`` of a Qwen3 model, both directions.

Export writes what ``transformers.Qwen3ForCausalLM`` needs (from
:func:`soda_mega.model.qwen3_mapping.hf_config_dict`) with ``vocab_size`` = the real
vocabulary (TP padding rows are dropped), plus a ``soda_mega`` block that ``transformers``
ignores and import reads: the vocabulary layout, its fingerprint, the text tokenizer kind,
the source checkpoint and the soda-mega version and commit.

Import accepts only what the soda-mega model computes identically: Qwen3, SiLU, no attention
bias, no sliding window, no RoPE scaling. Anything else is refused with the field named,
since a silently different model would be worse than none.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from soda_mega.config.fields import short
from soda_mega.config.schema import MAX_VOCAB, ModelConfig, SodaConfig
from soda_mega.hf.files import HFError
from soda_mega.model.qwen3_mapping import hf_config_dict
from soda_mega.tokens.layout import VocabLayout
from soda_mega.utils import strict_json

ARCHITECTURE = "Qwen3ForCausalLM"
MODEL_TYPE = "qwen3"
SODA_BLOCK = "soda_mega"
TORCH_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def export_config(cfg: SodaConfig, layout: VocabLayout, dtype: str, soda_block: dict) -> dict:
    """``config.json`` for the exported model."""
    out = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
    out.update(hf_config_dict(cfg, layout.size))
    out.update(
        torch_dtype=TORCH_DTYPES[dtype],
        initializer_range=cfg.model.init_std,
        attention_dropout=0.0,
        rope_scaling=None,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=cfg.model.num_layers,
        use_cache=True,
    )
    out[SODA_BLOCK] = soda_block
    return out


def generation_config(layout: VocabLayout) -> dict:
    """``generation_config.json``: document boundaries only; SODA's prompts choose the rest."""
    return {"bos_token_id": layout.bos_id, "eos_token_id": layout.eos_id,
            "pad_token_id": layout.eos_id}


def read_config(folder: Path) -> dict:
    """``config.json`` of a HuggingFace Qwen3 folder, checked for what soda-mega can run: every
    field soda-mega reads has its type and lies within the bounds of the config schema, so a
    hostile file fails here, naming the field, before anything is built from it."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise HFError(f"{folder}: no such folder")
    if not path.is_file():
        raise HFError(f"{folder}: has no config.json, so it is not a HuggingFace model folder")
    try:
        hf = strict_json.read_file(path)
    except strict_json.JSONProblem as err:
        raise HFError(f"{path}: {err}") from None
    if not isinstance(hf, dict):
        raise HFError(f"{path}: expected a JSON object, found a {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        raise HFError(f"{path}: model_type is {short(model_type)}; soda-mega imports Qwen3 models "
                      f"only (model_type {MODEL_TYPE!r}, architectures [{ARCHITECTURE!r}])")
    archs = hf.get("architectures") or [ARCHITECTURE]
    if not isinstance(archs, list) or ARCHITECTURE not in archs:
        raise HFError(f"{path}: architectures is {short(archs)}; soda-mega imports {ARCHITECTURE} only")
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu") != "silu", "SwiGLU with silu"),
        "attention_bias": (bool(hf.get("attention_bias", False)), "no attention biases"),
        "use_sliding_window": (bool(hf.get("use_sliding_window", False)), "full causal attention"),
        "rope_scaling": (bool(hf.get("rope_scaling")), "plain RoPE"),
    }
    for field, (bad, needs) in unsupported.items():
        if bad:
            raise HFError(f"{path}: {field} is {short(hf.get(field))}; the soda-mega model has {needs}")
    _check_fields(path, hf)
    return hf


# config.json field -> (the ModelConfig field whose bounds it takes, required)
_SHAPE_FIELDS = {"hidden_size": ("hidden_size", True), "num_hidden_layers": ("num_layers", True),
                 "num_attention_heads": ("num_attention_heads", True),
                 "intermediate_size": ("ffn_hidden_size", True),
                 "num_key_value_heads": ("num_kv_heads", False), "head_dim": ("head_dim", False),
                 "max_position_embeddings": ("seq_length", False)}
_NUMBER_FIELDS = ("rope_theta", "rms_norm_eps")


def _check_fields(path: Path, hf: dict) -> None:
    bounds = {f.name: f.metadata for f in dataclasses.fields(ModelConfig)}
    limits = {name: (1, bounds[field]["le"], required)
              for name, (field, required) in _SHAPE_FIELDS.items()}
    limits["vocab_size"] = (1, MAX_VOCAB, True)
    for name, (low, high, required) in limits.items():
        value = hf.get(name)
        if value is None and not required:
            continue
        if type(value) is not int or not low <= value <= high:
            raise HFError(f"{path}: {name} must be an integer in {low}..{high}, got {short(value)}")
    for name in ("bos_token_id", "eos_token_id"):
        value = hf.get(name)
        if value is not None and (type(value) is not int or value < 0):
            raise HFError(f"{path}: {name} must be a token id (an integer >= 0), got {short(value)}")
    for name in _NUMBER_FIELDS:
        value = hf.get(name)
        if value is not None and (type(value) not in (int, float) or not 0 < value < math.inf):
            raise HFError(f"{path}: {name} must be a positive number, got {short(value)}")
    if not isinstance(hf.get("tie_word_embeddings", False), bool):
        raise HFError(f"{path}: tie_word_embeddings must be true or false, got "
                      f"{short(hf['tie_word_embeddings'])}")
    block = hf.get(SODA_BLOCK)
    if block is not None and not isinstance(block, dict):
        raise HFError(f"{path}: {SODA_BLOCK} must be an object, got {short(block)}")
    for key in ("model", "text_tokenizer", "vocab_layout"):
        if (block or {}).get(key) is not None and not isinstance(block[key], dict):
            raise HFError(f"{path}: {SODA_BLOCK}.{key} must be an object, got {short(block[key])}")


def model_fields(hf: dict) -> dict:
    """The ``model`` config section fields that ``config.json`` determines."""
    heads = hf["num_attention_heads"]
    return {
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "ffn_hidden_size": hf["intermediate_size"],
        "rope_theta": float(hf.get("rope_theta", 10000.0)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    }
