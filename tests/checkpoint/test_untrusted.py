"""A checkpoint runs no code when it is loaded (issue 18).

A malicious pickle (its ``__reduce__`` creates a marker file) is planted in each file a load
opens: ``rng/rank0.pt``, Megatron's ``common.pt``, the ``.metadata`` of
``torch.distributed.checkpoint``, a non-tensor entry of a ``.distcp`` file, and the trainer
state. Resume (``soda-mega train``), ``eval nll``, ``export hf`` and ``training.init_from``
must each refuse it with exit 2 and a message naming the file, and the marker must never appear.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch_env import clean_env

pytestmark = pytest.mark.distributed  # launches the CLI in subprocesses

WORKER = Path(__file__).with_name("untrusted_worker.py")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # the copy is a hard link to the original checkpoint's file
    path.write_bytes(data)


def _plant_distcp_object(step: Path, marker: Path) -> Path:
    """Point one non-tensor entry of the checkpoint at a malicious pickle appended to its
    ``.distcp`` file (the metadata stays made of checkpoint classes only)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta = pickle.loads((step / ".metadata").read_bytes())
    key = next(k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(i for i in meta.storage_data if i.fqn == key)
    info = meta.storage_data[index]
    target = step / info.relative_path
    data = target.read_bytes()
    evil = _torch_bytes(_Evil(marker))
    _replace(target, data + evil)
    info.offset, info.length = len(data), len(evil)
    _replace(step / ".metadata", pickle.dumps(meta))
    return target


PLANTS = {
    "rng": lambda step, m: (_replace(step / "rng" / "rank0.pt", _torch_bytes(_Evil(m))),
                            step / "rng" / "rank0.pt")[1],
    "common": lambda step, m: (_replace(step / "common.pt", _torch_bytes({"x": _Evil(m)})),
                               step / "common.pt")[1],
    "dcp_metadata": lambda step, m: (_replace(step / ".metadata", pickle.dumps(_Evil(m))),
                                     step / ".metadata")[1],
    "distcp_object": _plant_distcp_object,
    "trainer_state": lambda step, m: (_replace(step / "trainer_state.json", pickle.dumps(_Evil(m))),
                                      step / "trainer_state.json")[1],
}


def _resign(step: Path) -> None:
    """What an attacker would do: make the checksums match the planted files."""
    try:
        from soda_mega.checkpoint.manifest import write_manifest
    except ImportError:
        return
    write_manifest(step)


def test_planted_pickles_are_refused_everywhere(train_run, corpus, tmp_path):
    source = train_run / "checkpoints"
    cases, expected = [], []
    for name, plant in PLANTS.items():
        run = tmp_path / name
        shutil.copytree(source, run / "checkpoints", copy_function=os.link)
        step = run / "checkpoints" / (source / "latest").read_text().strip()
        marker = tmp_path / f"marker-{name}"
        planted = plant(step, marker)
        _resign(step)
        data = f"--data.train={corpus / 'speech'},{corpus / 'text'}"
        common = ["--preset", "tiny", data, "--run.max_steps=3", "--run.tensorboard=false",
                  "--run.eval_interval=0"]
        for what, argv in (
                ("resume", ["train", *common, f"--run.dir={run}"]),
                ("init_from", ["train", *common, f"--run.dir={tmp_path / (name + '-ft')}",
                               f"--training.init_from={run}"]),
                ("eval nll", ["eval", "nll", str(run), "--data", str(corpus / "speech"),
                              "--max-batches", "1", "--quiet"]),
                ("export hf", ["export", "hf", str(run), str(tmp_path / (name + "-hf"))])):
            cases.append({"argv": argv})
            expected.append((name, what, planted, marker))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "cases.json"),
                           str(tmp_path / "results.json")], capture_output=True, text=True,
                          env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for (name, what, planted, marker), result in zip(expected, results):
        assert not marker.exists(), f"{what} ran the code planted in {name}"
        assert result["rc"] == 2, (name, what, result["stderr"][-3000:])
        assert str(planted) in result["stderr"], (name, what, result["stderr"][-2000:])
        assert "Traceback" not in result["stderr"], (name, what, result["stderr"][-3000:])
