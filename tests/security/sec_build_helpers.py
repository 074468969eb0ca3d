"""Shared helpers of the hostile-input tests of launch scripts and dataset builds (issue 21):
crafted WAV headers, the `data build` command run in this process, marker checks."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

# NOTE: the dataset-build tests' helpers (tiny configs, codes corpora, WAV tones) live in
# tests/data, which pytest puts on the path only for the tests of that folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))

from build_helpers import codes_corpus, tone, write_manifest  # noqa: E402

# What an injected shell command would leave behind; nothing may ever create it.
MARKER = "SODA_INJECTED_MARKER"

# Build options shared by the build tests: in this process, every record in train.
BUILD_ARGS = ["--preset", "tiny", "--quiet", "--json", "--data.build_workers=0",
              "--data.valid_fraction=0", "--data.build_unit_recordings=2",
              "--data.shard_size_limit=4096"]


def hostile_values(marker_dir: Path) -> list[str]:
    """Strings that run ``touch <marker_dir>/MARKER`` if a shell ever evaluates them unquoted."""
    marker = marker_dir / MARKER
    return [f"x\ntouch {marker}\n#", f"$(touch {marker})", f"`touch {marker}`", f"x; touch {marker}",
            f"x' ; touch {marker} ; '", f'x" ; touch {marker} ; "', f"x && touch {marker}"]


def crafted_wav(path: Path, rate: int, seconds: float = 0.25, pcm_rate: int = 16000) -> Path:
    """A 16-bit mono PCM WAV whose header declares ``rate`` Hz (any 32-bit value, 0 included)
    over a tone sampled at ``pcm_rate``."""
    pcm = (tone(seconds, pcm_rate) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, (rate * 2) & 0xFFFFFFFF, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def corpus_with(tmp: Path, bad: list[dict], good: int = 2) -> Path:
    """``good`` pre-encoded records (no codec run) followed by the ``bad`` manifest lines."""
    tmp.mkdir(parents=True, exist_ok=True)
    manifest = codes_corpus(tmp, n=good) if good else write_manifest(tmp / "manifest.jsonl", [])
    lines = manifest.read_text() + "".join(json.dumps(b) + "\n" for b in bad)
    manifest.write_text(lines)
    return manifest


def no_traceback(err: str) -> None:
    """Neither a Python traceback nor a Rust panic report reached stderr."""
    assert "Traceback" not in err and "panicked" not in err, err[-3000:]


__all__ = ["BUILD_ARGS", "MARKER", "codes_corpus", "corpus_with", "crafted_wav", "hostile_values",
           "no_traceback", "tone", "write_manifest"]
