"""Synthetic soda-mega datasets written straight from token arrays (no codec, no tokenizer).

For loader tests and benchmarks: the files follow the same contract (:mod:`.schema`) as
``soda-mega data build`` output, with ``codec: null`` and a ``synthetic`` tokenizer entry so
they can never be mistaken for real data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from soda_mega.data.schema import FORMAT, LENGTHS_FILE, MDS_COLUMNS, META_FILE
from soda_mega.data.streaming_compat import streaming_module
from soda_mega.tokens import VocabLayout


def write_split(split_dir: Path, layout: VocabLayout, docs: list[np.ndarray], kind: str,
                split: str = "train", masks: list[np.ndarray] | None = None,
                compression: str | None = None, size_limit: int = 1 << 12,
                hashes: list[str] | None = None) -> Path:
    """MDS shards + soda_meta.json + doc_lengths.npy for ``docs`` (one document each);
    ``hashes`` (e.g. ``["xxh64"]``) are written into the index for verification on read."""
    split_dir.mkdir(parents=True, exist_ok=True)
    writer_cls = streaming_module("format").MDSWriter
    with writer_cls(out=str(split_dir), columns=MDS_COLUMNS, compression=compression,
                    size_limit=size_limit, hashes=hashes or None) as writer:
        for i, doc in enumerate(docs):
            mask = masks[i] if masks else np.ones(len(doc), np.uint8)
            writer.write({"tokens": np.asarray(doc, np.int32), "loss_mask": mask.astype(np.uint8),
                          "doc_type": "text_only" if kind == "text" else "speech_only",
                          "record_id": f"r{i}"})
    np.save(split_dir / LENGTHS_FILE, np.array([len(d) for d in docs], np.int64))
    meta: dict = {"format": FORMAT, "split": split, "kind": kind, "vocab_layout": layout.to_dict(),
            "vocab_fingerprint": layout.fingerprint(), "codec": None,
            "tokenizer": {"kind": "synthetic", "path": None, "sha256": None}, "num_docs": len(docs),
            "doc_types": {}, "tokens": {"total": int(sum(len(d) for d in docs))},
            "audio_hours": 0.0, "skipped": []}
    (split_dir / META_FILE).write_text(json.dumps(meta))
    return split_dir


def random_docs(layout: VocabLayout, n: int, lo: int, hi: int, seed: int, kind: str) -> list[np.ndarray]:
    """Documents ``BOS body EOS``; text bodies use text ids, speech bodies audio ids."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        if kind == "text":
            body = rng.integers(0, 256, length)
        else:
            body = rng.integers(layout.audio_base, layout.size, length)
        docs.append(np.concatenate([[layout.bos_id], body, [layout.eos_id]]).astype(np.int32))
    return docs
