"""Mimi weights are read only as safetensors, and only from a path the user names (issue 21).

A pickle planted as Mimi weights (its ``__reduce__`` creates a marker file) is recorded in a
dataset's ``soda_meta.json`` (``codec.weights``, used by ``data inspect --wav``) and in a
checkpoint's configuration (``data.mimi_weights``, used by ``translate`` and the ``eval``
tasks). Before the fix moshi read it with ``torch.load``: a traceback with torch's default, the
planted code with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (set here, as a user might have it).
Now a recorded path is never loaded without ``--mimi-weights``, a named file must be
safetensors, and a damaged one is refused with exit 2 naming it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from sec_ckpt_helpers import Evil, run_cli_cases, tiny_checkpoint, tiny_dataset, with_data_field, write_wav

pytestmark = pytest.mark.distributed  # launches the CLI in a subprocess

UNSAFE_TORCH = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


def _evil_weights(path: Path, marker: Path) -> Path:
    buf = io.BytesIO()
    torch.save({"model": Evil(marker)}, buf)
    path.write_bytes(buf.getvalue())
    return path


def _record_codec(dataset: Path, weights: Path) -> None:
    """What a dataset built with ``weights`` records (``soda_meta.json`` of both splits)."""
    from soda_mega.data.codec import file_sha256, mimi_metadata

    for split in ("train", "valid"):
        meta_path = dataset / split / "soda_meta.json"
        meta = json.loads(meta_path.read_text())
        meta["codec"] = mimi_metadata(8, str(weights), file_sha256(weights), 0)
        meta_path.write_text(json.dumps(meta))


def test_codec_weights_from_data_or_checkpoints_are_never_unpickled(tmp_path_factory, tmp_path):
    marker = tmp_path / "marker"
    evil = _evil_weights(tmp_path / "mimi.safetensors", marker)  # the suffix is no safeguard
    evil_pt = _evil_weights(tmp_path / "mimi.pt", marker)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    data = tiny_dataset(tmp_path / "data")
    _record_codec(data, evil)
    step = with_data_field(tiny_checkpoint(tmp_path_factory), tmp_path / "run" / "step_00000000",
                           "mimi_weights", str(evil))
    audio = write_wav(tmp_path / "source.wav")
    wav = tmp_path / "out.wav"
    cases = [  # (argv, text the one error line must hold)
        (["data", "inspect", str(data), "--wav", str(wav)], [str(evil), "--mimi-weights"]),
        (["data", "inspect", str(data), "--wav", str(wav), "--mimi-weights", str(evil_pt)],
         [str(evil_pt), "safetensors"]),
        (["data", "inspect", str(data), "--wav", str(wav), "--mimi-weights", str(evil)],
         [str(evil), "safetensors"]),
        (["data", "inspect", str(data), "--wav", str(wav), "--mimi-weights", str(garbage)],
         [str(garbage), "safetensors"]),
        (["translate", str(step), str(audio), "--out", str(tmp_path / "tr"), "--max-new-tokens",
          "4"], [str(step), "data.mimi_weights", "--mimi-weights"]),
        (["translate", str(step), str(audio), "--out", str(tmp_path / "tr"), "--max-new-tokens",
          "4", "--mimi-weights", str(evil_pt)], [str(evil_pt), "safetensors"]),
    ]
    results = run_cli_cases([argv for argv, _ in cases], tmp_path, each=120, timeout=900,
                            env=UNSAFE_TORCH)
    failures = []
    for (argv, needles), result in zip(cases, results):
        err = result["stderr"]
        errors = [line for line in err.splitlines() if "error" in line]
        if (result["rc"] != 2 or "Traceback" in err or not errors
                or not all(n in errors[-1] for n in needles) or len(errors[-1]) > 1000):
            failures.append(f"{' '.join(argv[:2])} {argv[-1]}: rc {result['rc']}: {err[-800:]}")
    assert not marker.exists(), "planted code in Mimi weights ran"
    assert not wav.exists() and not (tmp_path / "tr").exists()
    assert not failures, "\n\n".join(failures)
