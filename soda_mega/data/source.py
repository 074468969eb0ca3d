"""Random access to the documents of one built split (MDS shards + soda_meta.json + lengths).

The loader plans packing from ``doc_lengths.npy`` alone and then reads only the documents its
rank needs, straight from the MDS shard files through mosaicml-streaming's shard readers. It
does not use ``StreamingDataset``: that class takes its world from ``RANK``/``WORLD_SIZE``
(soda-mega's data-parallel rank comes from Megatron's parallel state) and coordinates workers
through shared memory, which a crashed run can leave behind. Compressed shards are
decompressed once, next to the archive, with an atomic rename.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import numpy as np

from soda_mega.data.schema import FORMAT, LENGTHS_FILE, META_FILE, META_KEYS
from soda_mega.data.streaming_compat import streaming_module
from soda_mega.errors import SodaUserError
from soda_mega.tokens.layout import VocabLayout


class DatasetError(SodaUserError, ValueError):
    """A dataset folder is missing, malformed, or does not fit the model."""


def layout_differences(dataset: dict, model: dict) -> list[str]:
    """Human-readable list of vocabulary-layout fields that differ (dataset vs model)."""
    diffs = []
    for key in sorted(set(dataset) | set(model)):
        if dataset.get(key) != model.get(key):
            diffs.append(f"{key}: dataset {dataset.get(key)!r} != model {model.get(key)!r}")
    return diffs


def read_meta(split_dir: Path) -> dict:
    path = split_dir / META_FILE
    if not path.is_file():
        raise DatasetError(f"{split_dir} is not a soda-mega dataset split: {META_FILE} is missing "
                           "(build one with `soda-mega data build`)")
    meta = json.loads(path.read_text())
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise DatasetError(f"{path}: missing keys {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise DatasetError(f"{path}: format {meta['format']!r}, this soda-mega reads {FORMAT!r}")
    return meta


def _ensure_raw_shard(split_dir: Path, shard: dict) -> None:
    """Decompress a compressed shard next to its archive (atomic; once per machine)."""
    raw = split_dir / shard["raw_data"]["basename"]
    if raw.exists() or not shard.get("compression"):
        return
    compression = streaming_module("compression")
    archive = split_dir / shard["zip_data"]["basename"]
    data = compression.decompress(shard["compression"], archive.read_bytes())
    tmp = raw.with_name(raw.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, raw)


class DocumentSource:
    """One split of one built dataset: its metadata, document lengths and documents."""

    def __init__(self, root: str | Path, split: str = "train",
                 layout: VocabLayout | None = None) -> None:
        root = Path(root)
        if (root / split).is_dir():
            self.split_dir = root / split
        elif (root / META_FILE).is_file():
            self.split_dir = root  # a split folder given directly
        else:
            raise DatasetError(f"{root} has no {split!r} split (expected {root / split}); "
                               "build it with `soda-mega data build`")
        self.name = str(root)
        self.meta = read_meta(self.split_dir)
        if self.meta["split"] != split:
            raise DatasetError(f"{self.split_dir} holds the {self.meta['split']!r} split, "
                               f"not {split!r}: give the dataset root instead")
        if layout is not None:
            diffs = layout_differences(self.meta["vocab_layout"], layout.to_dict())
            if diffs:
                raise DatasetError(
                    f"{self.split_dir} was built for another vocabulary layout than the model's; "
                    f"rebuild it or change the vocab section: {'; '.join(diffs)}"
                )
        self.lengths = np.load(self.split_dir / LENGTHS_FILE).astype(np.int64)
        index = json.loads((self.split_dir / "index.json").read_text())
        self._shards = index["shards"]
        counts = [s["samples"] for s in self._shards]
        if sum(counts) != len(self.lengths):
            raise DatasetError(f"{self.split_dir}: {LENGTHS_FILE} has {len(self.lengths)} entries but "
                               f"the shards hold {sum(counts)} samples")
        self._starts = np.cumsum([0] + counts).tolist()
        self._readers: dict[int, object] = {}

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return len(self.lengths)

    def _reader(self, shard_idx: int):
        reader = self._readers.get(shard_idx)
        if reader is None:
            shard = self._shards[shard_idx]
            _ensure_raw_shard(self.split_dir, shard)
            fmt = streaming_module("format")
            reader = fmt.reader_from_json(str(self.split_dir), None, shard)
            self._readers[shard_idx] = reader
        return reader

    def get(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32, loss_mask uint8) of document ``idx``."""
        shard_idx = bisect.bisect_right(self._starts, idx) - 1
        sample = self._reader(shard_idx).get_item(idx - self._starts[shard_idx])
        tokens = np.asarray(sample["tokens"], dtype=np.int32)
        mask = np.asarray(sample["loss_mask"], dtype=np.uint8)
        if len(tokens) != self.lengths[idx] or len(mask) != len(tokens):
            raise DatasetError(f"{self.split_dir}: document {idx} has {len(tokens)} tokens, "
                               f"{LENGTHS_FILE} says {self.lengths[idx]}")
        return tokens, mask

    def __getstate__(self):
        # Shard readers hold file handles lazily; drop them when sent to a worker process.
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state
