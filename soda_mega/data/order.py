"""Shard-aware, lazily computed document order of one stream (bounded memory per rank).

Each epoch of a stream is a seeded order of its documents built in two levels, the idea of
mosaicml-streaming's ``py1b`` / ``py1br`` block shuffles:

1. the shards are permuted (seed, stream, epoch): ``O(shards)`` memory;
2. consecutive groups of ``window`` shards of that permutation form a *block*, and the
   documents of a block are permuted together (seed, stream, epoch, block).

So the documents a run reads at any moment come from one block of ``window`` shards per stream
(the next block is prefetched), which lets a per-node cache a fraction of the dataset's size
serve a whole run. ``window=0`` is one block of all shards: the global shuffle, which needs
``O(documents)`` memory and is kept as the reference for shuffle quality.

Only the current blocks are materialised (their document ids and a prefix sum of their
lengths); the per-shard token totals give the block offsets. Every lookup is therefore
``O(log shards + block)``, never ``O(history)``, and memory per rank is ``O(shards + block)``.
Lengths may be a read-only memory map: only the blocks in use are touched.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

Piece = tuple[int, int, int, int]  # (stream, document, first token, end token)
_KEEP_EPOCHS = 2
_KEEP_BLOCKS = 4


def shard_totals(lengths: np.ndarray, counts: Sequence[int], chunk: int = 1 << 22) -> np.ndarray:
    """Tokens per shard, reading ``lengths`` (possibly a memory map) a chunk at a time."""
    counts = np.asarray(counts, dtype=np.int64)
    totals = np.zeros(len(counts), dtype=np.int64)
    if not len(counts):
        return totals
    starts = np.concatenate([[0], np.cumsum(counts)])
    shard = 0
    for a in range(0, int(starts[-1]), chunk):
        b = min(a + chunk, int(starts[-1]))
        part = np.asarray(lengths[a:b], dtype=np.int64)
        prefix = np.concatenate([[0], np.cumsum(part)])
        while shard < len(counts) and starts[shard] < b:
            lo, hi = max(starts[shard], a) - a, min(starts[shard + 1], b) - a
            totals[shard] += prefix[hi] - prefix[lo]
            if starts[shard + 1] > b:
                break
            shard += 1
    _drop_pages(lengths)
    return totals


def _drop_pages(lengths) -> None:
    """Tell the kernel a memory-mapped array's pages are not needed (keeps RSS O(window))."""
    mm = getattr(lengths, "_mmap", None)
    if mm is not None:
        try:
            import mmap

            mm.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError, ValueError):
            pass


class StreamOrder:
    """Document order of one stream over endless epochs, with token-offset lookups."""

    def __init__(self, lengths: np.ndarray, shard_counts: Sequence[int] | None, seed: int,
                 stream: int, window: int, shuffle: bool = True,
                 totals: np.ndarray | None = None) -> None:
        self.lengths = lengths
        counts = [len(lengths)] if shard_counts is None else list(shard_counts)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        if int(self.starts[-1]) != len(lengths):
            raise ValueError(f"shard sample counts sum to {int(self.starts[-1])}, "
                             f"lengths have {len(lengths)} entries")
        self.totals = shard_totals(lengths, counts) if totals is None else np.asarray(totals, np.int64)
        self.seed, self.stream, self.shuffle = seed, stream, shuffle
        self.window = len(counts) if window <= 0 else min(window, len(counts))
        self.num_docs = len(lengths)
        self.epoch_tokens = int(self.totals.sum())
        self._epochs: OrderedDict[int, tuple] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        self.blocks_built = 0  # materialised blocks (work counter for tests and benchmarks)

    # ------------------------------------------------------------------ epochs and blocks
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard permutation, block token offsets, block document offsets) of ``epoch``."""
        hit = self._epochs.get(epoch)
        if hit is not None:
            self._epochs.move_to_end(epoch)
            return hit
        n = len(self.counts)
        perm = (np.random.default_rng([self.seed, self.stream, epoch]).permutation(n)
                if self.shuffle else np.arange(n))
        groups = np.arange(0, n, self.window)
        tokens = np.add.reduceat(self.totals[perm], groups) if n else np.zeros(0, np.int64)
        docs = np.add.reduceat(self.counts[perm], groups) if n else np.zeros(0, np.int64)
        hit = (perm, np.concatenate([[0], np.cumsum(tokens)]), np.concatenate([[0], np.cumsum(docs)]))
        self._epochs[epoch] = hit
        while len(self._epochs) > _KEEP_EPOCHS:
            self._epochs.popitem(last=False)
        return hit

    def block_shards(self, epoch: int, block: int) -> np.ndarray:
        perm = self._epoch(epoch)[0]
        return perm[block * self.window:(block + 1) * self.window]

    def _block(self, epoch: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(document ids in order, prefix sum of their lengths) of one block."""
        key = (epoch, block)
        hit = self._blocks.get(key)
        if hit is not None:
            self._blocks.move_to_end(key)
            return hit
        shards = self.block_shards(epoch, block)
        docs = np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in shards]
                              ) if len(shards) else np.zeros(0, np.int64)
        if self.shuffle and len(docs):
            rng = np.random.default_rng([self.seed, self.stream, epoch, block + 1])
            docs = docs[rng.permutation(len(docs))]
        lens = np.asarray(self.lengths[np.sort(docs)], dtype=np.int64) if len(docs) else docs
        # lengths in block order without a fancy index on the memory map in random order
        order = np.argsort(docs, kind="stable")
        block_lens = np.empty_like(lens)
        block_lens[order] = lens
        hit = (docs, np.concatenate([[0], np.cumsum(block_lens)]))
        self._blocks[key] = hit
        self.blocks_built += 1
        while len(self._blocks) > _KEEP_BLOCKS:
            self._blocks.popitem(last=False)
        return hit

    # ------------------------------------------------------------------ lookups
    def doc_at(self, epoch: int, position: int) -> int:
        """The ``position``-th document of ``epoch`` (sequential plans)."""
        _, _, doc_offsets = self._epoch(epoch)
        block = int(np.searchsorted(doc_offsets, position, side="right")) - 1
        docs, _ = self._block(epoch, block)
        return int(docs[position - doc_offsets[block]])

    def pieces(self, start: int, end: int) -> list[Piece]:
        """Pieces covering tokens ``[start, end)`` of the endless stream (epochs concatenated)."""
        out: list[Piece] = []
        if self.epoch_tokens == 0:
            return out
        t = start
        while t < end:
            epoch, offset = divmod(t, self.epoch_tokens)
            _, token_offsets, _ = self._epoch(epoch)
            block = int(np.searchsorted(token_offsets, offset, side="right")) - 1
            docs, prefix = self._block(epoch, block)
            local = offset - int(token_offsets[block])
            i = int(np.searchsorted(prefix, local, side="right")) - 1
            while t < end and i < len(docs):
                a = local - int(prefix[i])
                length = int(prefix[i + 1] - prefix[i])
                take = min(length - a, end - t)
                if take > 0:
                    out.append((self.stream, int(docs[i]), a, a + take))
                t += take
                local += take
                i += 1
        return out

    def doc_start_at_or_after(self, t: int) -> int:
        """The stream offset of the first document starting at or after token ``t``."""
        if self.epoch_tokens == 0:
            return t
        epoch, offset = divmod(t, self.epoch_tokens)
        _, token_offsets, _ = self._epoch(epoch)
        block = int(np.searchsorted(token_offsets, offset, side="right")) - 1
        docs, prefix = self._block(epoch, block)
        local = offset - int(token_offsets[block])
        i = int(np.searchsorted(prefix, local, side="right")) - 1
        if int(prefix[i]) == local:
            return t
        return t - local + int(prefix[i + 1])

    def shards_of(self, start: int, end: int) -> set[int]:
        """Shards holding tokens ``[start, end)`` (for prefetching)."""
        found: set[int] = set()
        if self.epoch_tokens == 0:
            return found
        t = start
        while t < end:
            epoch, offset = divmod(t, self.epoch_tokens)
            _, token_offsets, _ = self._epoch(epoch)
            block = int(np.searchsorted(token_offsets, offset, side="right")) - 1
            found.update(int(s) for s in self.block_shards(epoch, block) if self.totals[s])
            t = epoch * self.epoch_tokens + int(token_offsets[block + 1])
        return found
