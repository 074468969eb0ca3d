"""Issue 32 item 4 (audio): a small audio file that decodes to a great deal. Before, a 1.7 MB
FLAC of silence (20 min at 384 kHz) took 6.3 GB and 138 s in ``data build``: nothing bounded
the decoded length. Now the decoded audio of one record is bounded by
``data.max_record_audio_bytes`` (4 bytes x rate x channels x seconds): a header that declares
more is refused before anything is decoded, and decoding stops one sample past the bound
whatever the header says (a FLAC whose header understates its length is decoded by sphn to its
real end). A refused record is a bad record like any other: skipped and named, or exit 2 with
one line when nothing else is left.

Scaled down: 20 s of 384 kHz silence against a bound of 4 MiB (about 2.7 s at that rate); the
default bound is checked with a header that claims 20 minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile

from sec_build_helpers import BUILD_ARGS, corpus_with, no_traceback
from sec_dataset_helpers import REPO
from soda_mega.cli import main

RATE, SECONDS = 384_000, 20
LIMIT = 4 << 20


def _flac(path: Path, declared_samples: int | None = None) -> Path:
    """``SECONDS`` of 384 kHz mono silence as FLAC (a few KB); ``declared_samples`` rewrites
    the total its STREAMINFO header declares."""
    soundfile.write(str(path), np.zeros(RATE * SECONDS, np.int16), RATE, format="FLAC",
                    subtype="PCM_16")
    if declared_samples is not None:
        data = bytearray(path.read_bytes())
        assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
        # STREAMINFO bytes 10..17: rate (20 bits), channels-1 (3), bits-1 (5), total samples (36).
        field = int.from_bytes(data[18:26], "big")
        field = (field & ~((1 << 36) - 1)) | declared_samples
        data[18:26] = field.to_bytes(8, "big")
        path.write_bytes(bytes(data))
    return path


def _build(out: Path, capfd, manifest: Path, *extra: str) -> tuple[int, dict | None, str]:
    rc = main(["data", "build", str(out), "--manifest", str(manifest), *BUILD_ARGS, *extra])
    captured = capfd.readouterr()
    no_traceback(captured.err)
    return rc, json.loads(captured.out)[0] if rc == 0 else None, captured.err


@pytest.mark.parametrize("declared", [None, RATE], ids=["honest-header", "header-says-1s"])
def test_audio_past_the_bound_is_a_bad_record(tmp_path, capfd, declared):
    src = tmp_path / "in"
    manifest = corpus_with(src, [{"id": "bomb", "audio": "bomb.flac", "transcript": "silence"}])
    _flac(src / "bomb.flac", declared)
    assert (src / "bomb.flac").stat().st_size < 256 << 10
    rc, result, err = _build(tmp_path / "out", capfd, manifest, f"--data.max_record_audio_bytes={LIMIT}")
    assert rc == 0, err
    assert result["splits"]["train"]["num_records"] == 2  # the good records are built
    (skip,) = result["skipped"]
    assert skip["record"] == "bomb (manifest.jsonl:3)"
    assert "bomb.flac" in skip["reason"] and f"data.max_record_audio_bytes={LIMIT:,}" in skip["reason"]


def test_a_header_past_the_default_bound_is_refused_before_decoding(tmp_path, capfd):
    """20 minutes at 384 kHz declared (1.8 GB decoded): refused from the header, with the
    default bound; alone in its manifest, exit 2 and one line naming it and the field."""
    src = tmp_path / "in"
    manifest = corpus_with(src, [{"id": "bomb", "audio": "bomb.flac", "transcript": "silence"}], good=0)
    _flac(src / "bomb.flac", declared_samples=RATE * 1200)
    rc, _, err = _build(tmp_path / "out", capfd, manifest)
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert "bomb (manifest.jsonl:1)" in last and "bomb.flac" in last
    assert "1200.0 s at 384000 Hz" in last and "data.max_record_audio_bytes=1,073,741,824" in last


def test_decoding_stops_at_the_bound_in_memory(tmp_path):
    """The understated FLAC (header: 1 s; data: 20 s = 31 MB decoded) costs no more memory than
    the bound: sphn is asked for the bound's duration only."""
    path = _flac(tmp_path / "bomb.flac", declared_samples=RATE)
    code = textwrap.dedent(f"""
        import resource
        import sphn  # its import is not what is measured
        from soda_mega.data.write.inputs import InputError, read_audio, set_max_record_audio_bytes
        set_max_record_audio_bytes({LIMIT})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_audio({str(path)!r})
            print("read")
        except InputError as err:
            print("refused", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, err)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                                     str(REPO)])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict, grown_mb, reason = proc.stdout.split(maxsplit=2)
    assert verdict == "refused" and "data.max_record_audio_bytes" in reason, proc.stdout
    assert int(grown_mb) < 16, f"decoding grew the peak RSS by {grown_mb} MB (bound {LIMIT >> 20} MiB)"
