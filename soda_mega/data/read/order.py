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
Lengths may be a :class:`LengthsFile`: only the blocks in use are read.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

Piece = tuple[int, int, int, int]  # (stream, document, first token, end token)
_KEEP_EPOCHS = 2
_KEEP_BLOCKS = 4


def shard_totals(lengths: np.ndarray, counts: Sequence[int], chunk: int = 1 << 20,
                 check: Callable[[np.ndarray, int], None] | None = None) -> np.ndarray:
    """Tokens per shard, reading ``lengths`` (possibly a memory map) a chunk at a time;
    ``check(part, start)`` sees each chunk first (the one pass that validates the lengths)."""
    counts = np.asarray(counts, dtype=np.int64)
    totals = np.zeros(len(counts), dtype=np.int64)
    if not len(counts):
        return totals
    starts = np.concatenate([[0], np.cumsum(counts)])
    shard = 0
    for a in range(0, int(starts[-1]), chunk):
        b = min(a + chunk, int(starts[-1]))
        part = read_range(lengths, a, b)
        if check is not None:
            check(part, a)
        prefix = np.concatenate([[0], np.cumsum(part)])
        while shard < len(counts) and starts[shard] < b:
            lo, hi = max(starts[shard], a) - a, min(starts[shard + 1], b) - a
            totals[shard] += prefix[hi] - prefix[lo]
            if starts[shard + 1] > b:
                break
            shard += 1
    return totals


def read_range(lengths, a: int, b: int) -> np.ndarray:
    """``lengths[a:b]`` as int64, from an array or a :class:`LengthsFile`."""
    if isinstance(lengths, LengthsFile):
        return lengths.read(a, b)
    return np.asarray(lengths[a:b], dtype=np.int64)


class LengthsFile:
    """``doc_lengths.npy`` read on demand with ``pread``: nothing of it is held or mapped by the
    process, and the node's page cache (one copy per node) is shared by every rank and worker.

    The header is parsed by ``np.load(mmap_mode="r")``. Reads do not go through that map: on
    current kernels a fault on a file map can map a whole large folio (up to 2 MB), so touching
    one block's lengths would pin ~100 MB of the file in each process's RSS."""

    def __init__(self, path) -> None:
        array = np.load(path, mmap_mode="r")
        self.path = str(path)
        self.dtype = array.dtype
        self.offset = int(array.offset)
        self.shape = array.shape
        self.ndim = array.ndim
        del array
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.shape[0])

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def read(self, a: int, b: int) -> np.ndarray:
        a, b = max(0, int(a)), min(len(self), int(b))
        if b <= a:
            return np.zeros(0, dtype=np.int64)
        size = self.dtype.itemsize
        raw = os.pread(self._file(), (b - a) * size, self.offset + a * size)
        if len(raw) != (b - a) * size:
            raise EOFError(f"{self.path}: short read at entry {a} (the file is truncated)")
        return np.frombuffer(raw, dtype=self.dtype).astype(np.int64)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            return self.read(start, stop)[::step]
        k = int(key)
        k = k + len(self) if k < 0 else k
        if not 0 <= k < len(self):
            raise IndexError(f"document {k} outside 0..{len(self) - 1}")
        return int(self.read(k, k + 1)[0])

    def __array__(self, dtype=None, copy=None):
        out = self.read(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state


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
            perm = rng.permutation(len(docs))
            docs = docs[perm]
        lens = (np.concatenate([read_range(self.lengths, self.starts[s], self.starts[s + 1])
                                for s in shards]) if len(shards) else np.zeros(0, np.int64))
        if self.shuffle and len(docs):
            lens = lens[perm]
        hit = (docs, np.concatenate([[0], np.cumsum(lens)]))
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

    def _locate(self, t: int):
        """``(docs, prefix, local, i)``: the shuffle block holding stream token ``t``, its
        documents and their token prefix sums, ``t``'s offset in the block, and the index of the
        document it falls in."""
        epoch, offset = divmod(t, self.epoch_tokens)
        _, token_offsets, _ = self._epoch(epoch)
        block = int(np.searchsorted(token_offsets, offset, side="right")) - 1
        docs, prefix = self._block(epoch, block)
        local = offset - int(token_offsets[block])
        return docs, prefix, local, int(np.searchsorted(prefix, local, side="right")) - 1

    def pieces(self, start: int, end: int) -> list[Piece]:
        """Pieces covering tokens ``[start, end)`` of the endless stream (epochs concatenated)."""
        out: list[Piece] = []
        if self.epoch_tokens == 0:
            return out
        t = start
        while t < end:
            docs, prefix, local, i = self._locate(t)
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
        _, prefix, local, i = self._locate(t)
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
