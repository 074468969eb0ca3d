"""``import hf`` names a damaged weight file or index field instead of a traceback (issue 21).

Each folder has a valid ``config.json`` (the tiny preset's, with the ``soda_mega`` block) and one
hostile weight file: garbage bytes or a pickle as ``model.safetensors``, an index whose
``weight_map`` is not a mapping, holds a non-string value, or names a file outside the folder.
Each must end with exit 2 and one line naming the file and field; nothing is written to OUT.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from checkpoint_helpers import tiny_config
from sec_ckpt_helpers import Evil
from soda_mega.cli import main as cli

INDEX = "model.safetensors.index.json"


def _hf_folder(path: Path) -> Path:
    from soda_mega.hf.hf_config import export_config
    from soda_mega.tokens.layout import VocabLayout

    cfg = tiny_config()
    layout = VocabLayout.from_config(cfg.vocab)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(
        export_config(cfg, layout, "fp32", {"vocab_layout": layout.to_dict()})))
    return path


def _index(weight_map) -> str:
    return json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})


def _pickle(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"model.embed_tokens.weight": Evil(marker)}, buf)
    return buf.getvalue()


CASES = {  # name -> (files to write: name -> bytes/str, text the error line must hold)
    "garbage": ({"model.safetensors": b"\x07" * 8 + b"garbage" * 9}, ["model.safetensors"]),
    "short": ({"model.safetensors": b"\x01"}, ["model.safetensors"]),
    "pickle": (None, ["model.safetensors"]),
    "map_not_object": ({INDEX: _index(["model-00001-of-00001.safetensors"])},
                       [INDEX, "weight_map"]),
    "value_not_string": ({INDEX: _index({"model.embed_tokens.weight": 5})},
                         [INDEX, "weight_map", "model.embed_tokens.weight"]),
    "value_outside": ({INDEX: _index({"model.embed_tokens.weight": "../outside.safetensors"})},
                      [INDEX, "outside.safetensors"]),
    "value_absolute": ({INDEX: _index({"model.embed_tokens.weight": "/dev/zero"})},
                       [INDEX, "/dev/zero"]),
    "index_not_object": ({INDEX: "[1, 2]"}, [INDEX]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_hf_weights_are_named(name, tmp_path, capsys):
    files, needles = CASES[name]
    marker = tmp_path / "marker"
    folder = _hf_folder(tmp_path / "hf")
    for fname, data in (files or {"model.safetensors": _pickle(marker)}).items():
        (folder / fname).write_bytes(data.encode() if isinstance(data, str) else data)
    (tmp_path / "outside.safetensors").write_bytes(b"\x00" * 16)
    out = tmp_path / "out"
    rc = cli(["import", "hf", str(folder), str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "import hf" in line or "error" in line]
    assert rc == 2, err[-2000:]
    assert lines and all(n in lines[-1] for n in needles), err[-2000:]
    assert len(lines[-1]) < 1000
    assert not out.exists() and not marker.exists()
