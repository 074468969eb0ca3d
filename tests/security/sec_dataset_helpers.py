"""Helpers of the hostile-dataset tests (``test_sec_dataset_*``): small splits written with
mosaicml-streaming's own ``MDSWriter`` (hashes and ``doc_lengths.npy`` consistent, so only the
crafted part is wrong), index edits, and the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from soda_mega.config import load_config
from soda_mega.data.schema import LENGTHS_FILE, MDS_COLUMNS, META_FILE
from soda_mega.data.streaming_compat import streaming_base, streaming_module
from soda_mega.data.write.synthetic import random_docs, write_split
from soda_mega.tokens import VocabLayout

REPO = Path(__file__).resolve().parents[2]


def tiny_layout() -> VocabLayout:
    return VocabLayout.from_config(load_config(preset="tiny").vocab)


class Plant:
    """Unpickling this object opens (creates) ``marker``: proof that a dataset ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle_split(split_dir: Path, layout: VocabLayout, marker: Path, *, split: str = "train",
                       n: int = 12, mode: str = "extra") -> Path:
    """A split whose shards carry a ``pkl`` column, written by streaming's ``MDSWriter``.

    ``mode="extra"`` adds a ``payload`` column; ``mode="record_id"`` re-declares the writer's
    ``record_id`` column as ``pkl``. Everything else (hashes, lengths, meta) is consistent."""
    docs = random_docs(layout, n, 20, 120, 7, "speech")
    # The soda_meta.json of the same documents, written aside (MDSWriter wants an empty folder).
    aside = write_split(split_dir.with_name(split_dir.name + ".meta"), layout, docs, "speech", split=split)
    split_dir.mkdir(parents=True, exist_ok=True)
    columns = dict(MDS_COLUMNS)
    if mode == "extra":
        columns["payload"] = "pkl"
    else:
        columns["record_id"] = "pkl"
    with streaming_base().MDSWriter(out=str(split_dir), columns=columns, size_limit=1 << 12,
                                    hashes=["xxh64"]) as writer:
        for i, doc in enumerate(docs):
            sample = {"tokens": doc, "loss_mask": np.ones(len(doc), np.uint8),
                      "doc_type": "speech_only", "record_id": f"r{i}"}
            if mode == "extra":
                sample["payload"] = Plant(marker)
            else:
                sample["record_id"] = Plant(marker)
            writer.write(sample)
    for name in (META_FILE, LENGTHS_FILE):
        (aside / name).replace(split_dir / name)
    shutil.rmtree(aside)
    return split_dir


def plain_split(split_dir: Path, layout: VocabLayout, *, split: str = "train", n: int = 12,
                compression: str | None = None, hashes=("xxh64",)) -> Path:
    return write_split(split_dir, layout, random_docs(layout, n, 20, 120, 3, "speech"), "speech",
                       split=split, compression=compression, hashes=list(hashes) or None)


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    """Apply ``change`` to the JSON object in ``path`` (it edits in place or returns a new one)."""
    obj = json.loads(path.read_text())
    new = change(obj)
    path.write_text(json.dumps(obj if new is None else new))


def edit_index(split_dir: Path, change: Callable[[dict], object]) -> None:
    edit_json(split_dir / "index.json", change)


def edit_meta(split_dir: Path, change: Callable[[dict], object]) -> None:
    edit_json(split_dir / META_FILE, change)


def xxh64(data: bytes) -> str:
    return streaming_module("hashing").get_hash("xxh64", data)


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``soda-mega ARGS`` in a fresh Python (the way a user runs it)."""
    full = dict(os.environ if env is None else env)
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH", ""), str(REPO)]))
    return subprocess.run([sys.executable, "-m", "soda_mega.cli", *args], capture_output=True,
                          text=True, env=full, timeout=timeout, cwd=str(REPO))


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and one stderr (or verify report) line that holds every needle."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"rc {proc.returncode}\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    lines = [x for x in text.splitlines() if all(n in x for n in needles)]
    assert lines, f"no line with {needles}:\n{text[-3000:]}"
    return lines[0]


def main_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """``soda_mega.cli.main(ARGS)`` in this process (the CLI's own exit code and output; for
    the long tables of malformed files, where a fresh Python per case would cost seconds)."""
    from soda_mega.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["soda-mega", *args], rc, out.out, out.err)
