"""A text tokenizer path recorded in a checkpoint is data from elsewhere (issue 21 follow-up).

``translate`` and the ``eval`` tasks read the tokenizer the checkpoint's ``data.tokenizer``
names unless ``--tokenizer`` is given. Before the fix a missing file ended in a
``FileNotFoundError`` traceback. A recorded path may also name a device or a FIFO (which
would block the reader forever) or a file far larger than any tokenizer.json. Each must stop
with exit 2 and one line naming the path and ``--tokenizer``; nothing is written.
"""

from __future__ import annotations

import os

import pytest

from sec_ckpt_helpers import run_cli_cases, tiny_checkpoint, with_data_field, write_wav

pytestmark = pytest.mark.distributed  # launches the CLI in a subprocess


def test_recorded_tokenizer_paths_are_refused_without_traceback(tmp_path_factory, tmp_path):
    fifo = tmp_path / "tokenizer.fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:  # sparse: no disk is used
        f.truncate(300 << 20)
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\xff" * 64)
    audio = write_wav(tmp_path / "source.wav")
    source = tiny_checkpoint(tmp_path_factory)
    paths = [str(tmp_path / "missing" / "tokenizer.json"), "/dev/zero", str(fifo), str(huge),
             str(garbage)]
    cases = []
    for i, path in enumerate(paths):
        step = with_data_field(source, tmp_path / f"run{i}" / "step_00000000", "tokenizer", path)
        cases.append((["translate", str(step), str(audio), "--out", str(tmp_path / f"tr{i}"),
                       "--max-new-tokens", "4"], path))
    results = run_cli_cases([argv for argv, _ in cases], tmp_path, each=120, timeout=900)
    failures = []
    for (_argv, path), result in zip(cases, results):
        err = result["stderr"]
        errors = [line for line in err.splitlines() if "error" in line]
        if (result["rc"] != 2 or "Traceback" in err or not errors or path not in errors[-1]
                or "--tokenizer" not in errors[-1] or len(errors[-1]) > 1000):
            failures.append(f"{path}: rc {result['rc']}: {err[-800:]}")
    assert not any((tmp_path / f"tr{i}").exists() for i in range(len(paths)))
    assert not failures, "\n\n".join(failures)
