"""Shared helpers of the dataset-build tests: tiny configs, hand-made inputs, WAV writers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from soda_mega.config import load_config
from soda_mega.config.schema import SodaConfig
from soda_mega.data.streaming_compat import streaming_base, streaming_module


def tiny_config(*overrides: str) -> SodaConfig:
    """The tiny preset (byte tokenizer layout, 8 x 2048 codes) with build-friendly defaults."""
    base = ["--data.build_workers=0", "--data.valid_fraction=0.3", "--data.build_unit_recordings=2",
            "--data.shard_size_limit=4096"]
    return load_config(None, "tiny", [*base, *overrides])


def random_codes(seed: int, frames: int, k: int = 8, size: int = 2048) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, size, (k, frames)).astype(np.int16)


def write_manifest(path: Path, records: list) -> Path:
    """JSONL manifest; a str entry is written verbatim (for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def codes_corpus(tmp: Path, n: int = 7, frames: int = 40, seed: int = 0) -> Path:
    """``n`` two-segment recordings given as .npy codes, plus their manifest."""
    tmp.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        np.save(tmp / f"c{i}.npy", random_codes(seed + i, frames + i))
        records.append({"id": f"rec{i}", "codes": f"c{i}.npy",
                        "segments": [{"start": 0.0, "end": 1.2, "text": f"first part {i}"},
                                     {"start": 1.6, "end": 3.1, "text": f"second part {i}"}]})
    return write_manifest(tmp / "manifest.jsonl", records)


def wav_bytes(samples: np.ndarray, rate: int, fmt_code: int = 1, bits: int = 16) -> bytes:
    """A RIFF/WAVE file; ``samples`` is [S] or [C, S] already in the target sample type."""
    data = np.asarray(samples)
    channels = 1 if data.ndim == 1 else data.shape[0]
    payload = (data.T if data.ndim == 2 else data).tobytes()
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_code, channels, rate, rate * block, block, bits)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data"
            + struct.pack("<I", len(payload)) + payload)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tone(seconds: float, rate: int, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) * (np.sin(2 * np.pi * 1.5 * t) > 0)).astype(np.float32)


def read_split(split_dir: Path) -> list[dict]:
    """Every MDS sample of a split, in order, through mosaicml-streaming's shard readers."""
    fmt = streaming_module("format")
    index = json.loads((split_dir / "index.json").read_text())
    samples = []
    for shard in index["shards"]:
        reader = fmt.reader_from_json(str(split_dir), None, shard)
        samples += [reader.get_item(i) for i in range(shard["samples"])]
    return samples


def read_split_streaming(split_dir: Path) -> list[dict]:
    """The same through ``StreamingDataset`` (once per folder: it claims the folder in shm)."""
    ds = streaming_base().StreamingDataset(local=str(split_dir), batch_size=1, shuffle=False)
    return [ds[i] for i in range(len(ds))]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root`` (for byte-identical comparisons)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
