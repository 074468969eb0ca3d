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

import json
from pathlib import Path

from soda_mega.config.schema import SodaConfig
from soda_mega.hf.files import HFError
from soda_mega.model.qwen3_mapping import hf_config_dict
from soda_mega.tokens.layout import VocabLayout

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
    """``config.json`` of a HuggingFace Qwen3 folder, checked for what soda-mega can run."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise HFError(f"{folder}: no such folder")
    if not path.is_file():
        raise HFError(f"{folder}: has no config.json, so it is not a HuggingFace model folder")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFError(f"{path}: not valid JSON ({err})") from None
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        raise HFError(f"{path}: model_type is {model_type!r}; soda-mega imports Qwen3 models only "
                      f"(model_type {MODEL_TYPE!r}, architectures [{ARCHITECTURE!r}])")
    archs = hf.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in archs:
        raise HFError(f"{path}: architectures is {archs}; soda-mega imports {ARCHITECTURE} only")
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu") != "silu", "SwiGLU with silu"),
        "attention_bias": (bool(hf.get("attention_bias", False)), "no attention biases"),
        "use_sliding_window": (bool(hf.get("use_sliding_window", False)), "full causal attention"),
        "rope_scaling": (bool(hf.get("rope_scaling")), "plain RoPE"),
    }
    for field, (bad, needs) in unsupported.items():
        if bad:
            raise HFError(f"{path}: {field} is {hf.get(field)!r}; the soda-mega model has {needs}")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "vocab_size"):
        if not isinstance(hf.get(field), int):
            raise HFError(f"{path}: {field} is missing or not an integer")
    return hf


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
