"""A checkpoint's ``manifest.json`` names only regular files inside the checkpoint (issue 21).

Each case plants one hostile manifest entry in a copy of a tiny checkpoint: a path that climbs
out to ``/dev/zero`` (hashed forever before the fix), an absolute path, a path to a file beside
the checkpoint (read before the fix), a symlink and a FIFO inside the folder, entries of the
wrong type and a manifest nested too deep for the parser (tracebacks before the fix).
``eval nll`` and ``export hf`` must refuse each with exit 2 and one line naming the checkpoint
and the entry, within seconds; nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sec_ckpt_helpers import edit_manifest, hostile_copy, replace_file, run_cli_cases, tiny_checkpoint, tiny_dataset

pytestmark = pytest.mark.distributed  # launches the CLI in a subprocess

_ENTRY = {"size": 0, "xxh3_64": "0" * 16}
_UP = "../" * 40  # more than enough to climb from any temporary folder to /
RAW = object()  # the plant wrote the whole manifest


def _outside_file(step: Path):
    """A file beside the checkpoint, with its true size and hash: before the fix it was read,
    accepted as part of the checkpoint, and the command went on."""
    from soda_mega.checkpoint.manifest import file_hash

    secret = step.parent / "secret.txt"
    secret.write_text("a file beside the checkpoint\n")
    return "../secret.txt", {"size": secret.stat().st_size, "xxh3_64": file_hash(secret)}


def _symlink(step: Path):
    os.symlink("/dev/zero", step / "zeros.bin")
    return "zeros.bin", None


def _fifo(step: Path):
    os.mkfifo(step / "pipe.bin")
    return "pipe.bin", None


def _deep(step: Path):
    replace_file(step / "manifest.json", "[" * 100_000 + "]" * 100_000)
    return "manifest.json", RAW


# name -> (plant(step) -> (name the message must hold, its manifest entry: None = a zero-size
# one), the word the message must hold)
CASES = {
    "dev_zero_up": (lambda step: (_UP + "dev/zero", None), "refused"),
    "absolute": (lambda step: ("/dev/zero", None), "refused"),
    "outside_file": (_outside_file, "refused"),
    "symlink_out": (_symlink, "refused"),
    "fifo": (_fifo, "refused"),
    "entry_not_object": (lambda step: ("trainer_state.json", 5), "damaged"),
    "size_not_int": (lambda step: ("common.pt", {"size": "big", "xxh3_64": "0" * 16}), "damaged"),
    "nested_too_deep": (_deep, "damaged"),
}


def test_hostile_manifest_entries_are_refused(tmp_path_factory, tmp_path):
    source = tiny_checkpoint(tmp_path_factory)
    data = tiny_dataset(tmp_path / "data")
    argvs, expected = [], []
    for name, (plant, word) in CASES.items():
        step = hostile_copy(source, tmp_path / name / "step_00000000")
        entry_name, entry = plant(step)
        if entry is not RAW:
            entry = dict(_ENTRY) if entry is None else entry
            # edit_manifest calls it at once: entry_name and entry are this case's
            edit_manifest(step, lambda m: m["files"].__setitem__(entry_name, entry))  # noqa: B023
        out = tmp_path / f"{name}-hf"
        argvs.append(["eval", "nll", str(step), "--data", str(data), "--max-batches", "1",
                      "--quiet"])
        expected.append((name, "eval nll", step, entry_name, word, None))
        argvs.append(["export", "hf", str(step), str(out)])
        expected.append((name, "export hf", step, entry_name, word, out))
    results = run_cli_cases(argvs, tmp_path, each=30, timeout=600)
    failures = []
    for (name, what, step, entry_name, word, out), result in zip(expected, results):
        err = result["stderr"]
        lines = [line for line in err.splitlines() if str(step) in line]
        if (result["rc"] != 2 or "Traceback" in err or not lines or entry_name[:40] not in lines[-1]
                or word not in lines[-1] or len(lines[-1]) > 1000
                or (out is not None and out.exists())):
            failures.append(f"{name} / {what}: rc {result['rc']}: {err[-600:]}")
    assert not failures, "\n\n".join(failures)
