"""HuggingFace weight files: ``model.safetensors``, or shards plus ``model.safetensors.index.json``.

The layout is the one ``transformers`` writes with ``save_pretrained(max_shard_size=...)``:
one file while the weights fit in ``max_shard_size``, otherwise
``model-0000i-of-0000n.safetensors`` files filled in order and an index whose ``weight_map``
names the file of each tensor. Tensors are written in a natural order of their names
(``layers.2`` before ``layers.10``), so two exports of the same weights are the same files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from soda_mega.hf.files import HFError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _quote(value) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else \
        f"a {type(value).__name__}"
    return text if len(text) <= 100 else text[:100] + "..."


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Names per shard, filled in natural order; a tensor larger than the limit gets its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors, key=natural_key):
        n = _nbytes(tensors[name])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` into ``folder``; returns the file names written (index included)."""
    from safetensors.torch import save_file

    meta = {"format": "pt"}  # transformers refuses safetensors files without a pt/tf/flax format
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file({k: tensors[k].contiguous() for k in shards[0]}, str(folder / SINGLE), metadata=meta)
        return [SINGLE]
    files, weight_map = [], {}
    for i, names in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in names}, str(folder / fname), metadata=meta)
        files.append(fname)
        weight_map.update({k: fname for k in names})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items(), key=lambda kv: natural_key(kv[0])))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + [INDEX]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a HuggingFace model folder (the index's, or the single file)."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                RecursionError) as err:
            raise HFError(f"{index}: not a safetensors index (needs a 'weight_map'): "
                          f"{str(err)[:200]}") from None
        if not isinstance(weight_map, dict):
            raise HFError(f"{index}: weight_map is a {type(weight_map).__name__}, not a mapping of "
                          "tensor names to weight files")
        for tensor, name in weight_map.items():
            if not (isinstance(name, str) and name.endswith(".safetensors")
                    and Path(name).name == name and name != ".safetensors"):
                raise HFError(f"{index}: weight_map[{str(tensor)[:100]!r}] is {_quote(name)}, not "
                              "the name of a .safetensors file in the model folder")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise HFError(f"{index} names weight files that are missing: {', '.join(missing[:5])}")
        return files
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        raise HFError(f"{folder}: has {', '.join(others[:3])} but no {SINGLE} or {INDEX}; "
                      "sharded weights need their index file")
    bins = sorted(p.name for p in folder.glob("*.bin"))
    if bins:
        raise HFError(f"{folder}: holds torch weights ({', '.join(bins[:3])}); only safetensors are "
                      "read. Convert them once with transformers: AutoModelForCausalLM."
                      "from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True)")
    raise HFError(f"{folder}: no weights ({SINGLE} or {INDEX})")


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """All tensors of a HuggingFace model folder, and the files they came from."""
    from safetensors.torch import load_file

    files = weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            part = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            text = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise HFError(f"{path}: not a readable safetensors file ({text}); only safetensors "
                          "weights are read (never a pickle)") from None
        clash = sorted(set(part) & set(tensors))
        if clash:
            raise HFError(f"{path}: tensor {clash[0]} appears in more than one weight file")
        tensors.update(part)
    return tensors, files
