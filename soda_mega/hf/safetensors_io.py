"""HuggingFace weight files: ``model.safetensors``, or shards plus ``model.safetensors.index.json``.

The layout is the one ``transformers`` writes with ``save_pretrained(max_shard_size=...)``,
planned by the same function (``huggingface_hub.split_torch_state_dict_into_shards``): one file
while the weights fit in ``max_shard_size``, otherwise ``model-0000i-of-0000n.safetensors``
files filled in order (a tensor larger than the limit gets a file of its own) and an index
whose ``weight_map`` names the file of each tensor. Tensors are planned and written in a natural
order of their names (``layers.2`` before ``layers.10``), so two exports of the same weights
are the same files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from huggingface_hub.serialization import StateDictSplit

from soda_mega.hf.files import HFError
from soda_mega.utils import strict_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_FILE_PATTERN = "model{suffix}.safetensors"  # huggingface_hub's suffix: "" or "-0000i-of-0000n"


def _quote(value) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else \
        f"a {type(value).__name__}"
    return text if len(text) <= 100 else text[:100] + "..."


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> StateDictSplit:
    """huggingface_hub's shard plan of ``tensors`` in natural order: file names, the tensors of
    each file, and the index's ``metadata`` (``total_size``)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    # NOTE: planned on meta tensors of the same shapes: the export's tensors can be views of one
    # storage (q/k/v cut from a fused weight), which the hub would count and place as one
    # storage, but each view is written as its own tensor and its own bytes.
    shapes = {name: torch.empty(tensors[name].shape, dtype=tensors[name].dtype, device="meta")
              for name in sorted(tensors, key=natural_key)}
    return split_torch_state_dict_into_shards(shapes, filename_pattern=_FILE_PATTERN,
                                              max_shard_size=max_shard_bytes)


def write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` into ``folder``; returns the file names written (index included)."""
    from safetensors.torch import save_file

    meta = {"format": "pt"}  # transformers refuses safetensors files without a pt/tf/flax format
    plan = plan_shards(tensors, max_shard_bytes)
    files = list(plan.filename_to_tensors) or [SINGLE]  # (no tensors: one empty file)
    for fname in files:
        names = plan.filename_to_tensors.get(fname, [])
        save_file({k: tensors[k].contiguous() for k in names}, str(folder / fname), metadata=meta)
    if not plan.is_sharded:
        return files
    index = {"metadata": plan.metadata,
             "weight_map": dict(sorted(plan.tensor_to_filename.items(), key=lambda kv: natural_key(kv[0])))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + [INDEX]


def _inside(folder: Path, path: Path, who) -> None:
    """Refuse a weight file that is a symlink leading out of the model folder, or not a regular
    file: only the folder's own files are read.

    NOTE: a snapshot of the HuggingFace hub cache (``models--ORG--NAME/snapshots/REV/``) holds
    only links into its repository's ``blobs/`` folder; those are the model's own files."""
    real, home = path.resolve(), folder.resolve()
    homes = [home] + ([home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [])
    if not any(h in real.parents for h in homes):
        raise HFError(f"{who} {path.name}, a link that leads out of the model folder (to "
                      f"{str(real)[:200]!r}); refused: only files inside the folder are read")
    if not real.is_file():
        raise HFError(f"{who} {path.name}, which is not a regular file; refused")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a HuggingFace model folder (the index's, or the single file)."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = strict_json.read_file(index)["weight_map"]
        except strict_json.JSONProblem as err:
            raise HFError(f"{index}: {err}") from None
        except (KeyError, TypeError) as err:
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
        for path in files:
            _inside(folder, path, f"{index}: names")
        return files
    if (folder / SINGLE).is_file():
        _inside(folder, folder / SINGLE, f"{folder}:")
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


def weight_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, file name) of every tensor of a HuggingFace model folder, from the safetensors
    headers alone (no tensor is read), so a config can be checked against the weights before
    anything is built from it."""
    from safetensors import safe_open

    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = (tuple(f.get_slice(name).get_shape()), path.name)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            text = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise HFError(f"{path}: not a readable safetensors file ({text}); only safetensors "
                          "weights are read (never a pickle)") from None
    return shapes


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
