"""Closed-form plan of split-packed training windows: any global step, without replaying.

Each stream is an endless token stream (its documents in :class:`.order.StreamOrder` order,
epoch after epoch). The packed token stream the windows are cut from is built in *mixing
steps* of nominal size ``T = B * seq`` (one global batch of new tokens). Mixing step ``g``
takes from stream ``i`` the whole documents that start in ``[Q_i(g), Q_i(g + 1))``, where

    Q_i(g) = floor(g * T * w_i)          for every stream but the heaviest one, r,
    Q_r(g) = g * T - sum_{i != r} Q_i(g)

(exact rational arithmetic on the weights), i.e. the tokens ``[D_i(g), D_i(g + 1))`` with
``D_i(g)`` the first document start at or after ``Q_i(g)``. Inside a mixing step the
documents are interleaved by the same rule as the sequential plan (the next document comes from
the stream whose share of the step is furthest below its weight), and the steps are
concatenated. So every document stays whole and contiguous in the packed stream, every
stream's share of any prefix of it is within about one document of its weight (the mixture
holds per global step), and the packed position where mixing step ``g`` starts is a formula,
``S(g) = sum_i D_i(g)``: window ``w`` (tokens ``[w*seq, w*seq + seq + 1)``) is found by looking
up the step that holds its first token, with no history.

The plan has no state: the loader state is the step number, and a rank (or a loader worker)
computes only the steps it reads, in ``O(step + block)`` work and memory.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from fractions import Fraction

from soda_mega.data.read.order import Piece, StreamOrder


class StepPlan:
    """Windows of split-packed training by global window index, computed directly."""

    def __init__(self, orders: Sequence[StreamOrder], weights: Sequence[float],
                 seq_length: int, global_batch_size: int) -> None:
        if len(orders) != len(weights) or not orders:
            raise ValueError("need one weight per stream and at least one stream")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {list(weights)}")
        for i, (order, w) in enumerate(zip(orders, weights)):
            if w > 0 and order.epoch_tokens == 0:
                raise ValueError(f"stream {i} has weight {w} but no tokens")
        self.orders = list(orders)
        exact = [Fraction(float(w)) for w in weights]
        total = sum(exact)
        self.shares = [w / total for w in exact]
        self.weights = [float(s) for s in self.shares]
        self.seq = seq_length
        self.batch = global_batch_size
        self.tokens_per_step = seq_length * global_batch_size
        self.heaviest = max(range(len(exact)), key=lambda i: (self.shares[i], -i))
        self._cache: dict[int, tuple[list[Piece], list[int], int]] = {}
        self.steps_built = 0  # mixing-step layouts computed (work counter for tests, benchmarks)

    # ------------------------------------------------------------------ positions
    def quotas(self, step: int) -> list[int]:
        """Token quota of each stream before mixing step ``step``."""
        total = step * self.tokens_per_step
        out = [int(total * s) for s in self.shares]  # floor: all terms are >= 0
        out[self.heaviest] = 0
        out[self.heaviest] = total - sum(out)
        return out

    def offsets(self, step: int) -> list[int]:
        """Stream offset of each stream where mixing step ``step`` starts (document starts)."""
        return [o.doc_start_at_or_after(q) if q else 0
                for o, q in zip(self.orders, self.quotas(step))]

    def start(self, step: int) -> int:
        """Packed position of the first token of mixing step ``step``."""
        return sum(self.offsets(step))

    def step_of(self, position: int) -> int:
        """The mixing step holding packed token ``position``."""
        g = position // self.tokens_per_step
        while g > 0 and self.start(g) > position:
            g -= 1
        while self.start(g + 1) <= position:
            g += 1
        return g

    # ------------------------------------------------------------------ layout
    def layout(self, step: int) -> tuple[list[Piece], list[int], int]:
        """(documents of a mixing step in order, packed start of each, packed end of the step)."""
        hit = self._cache.get(step)
        if hit is not None:
            return hit
        lo, hi = self.offsets(step), self.offsets(step + 1)
        queues = [self.orders[i].pieces(lo[i], hi[i]) if hi[i] > lo[i] else []
                  for i in range(len(self.orders))]
        heads = [0] * len(queues)
        emitted = [0] * len(queues)
        pieces: list[Piece] = []
        starts: list[int] = []
        at = sum(lo)
        live = [i for i, q in enumerate(queues) if q]
        while live:
            i = min(live, key=lambda k: (emitted[k] / self.weights[k], k))
            piece = queues[i][heads[i]]
            heads[i] += 1
            if heads[i] == len(queues[i]):
                live.remove(i)
            size = piece[3] - piece[2]
            pieces.append(piece)
            starts.append(at)
            at += size
            emitted[i] += size
        if len(self._cache) >= 8:
            self._cache.pop(next(iter(self._cache)))
        self._cache[step] = (pieces, starts, at)
        self.steps_built += 1
        return pieces, starts, at

    def window(self, index: int) -> list[Piece]:
        """Pieces of global window ``index``: packed tokens ``[index*seq, index*seq + seq + 1)``."""
        a = index * self.seq
        b = a + self.seq + 1
        out: list[Piece] = []
        step = self.step_of(a)
        while a < b:
            pieces, starts, end = self.layout(step)
            j = max(bisect.bisect_right(starts, a) - 1, 0)
            while j < len(pieces) and starts[j] < b:
                s, d, x, y = pieces[j]
                lo = max(a - starts[j], 0)
                hi = min(b - starts[j], y - x)
                if hi > lo:
                    out.append((s, d, x + lo, x + hi))
                j += 1
            a = max(a, end)
            step += 1
        return out

    def shards(self, first_window: int, last_window: int) -> list[set[int]]:
        """Per stream, the shards holding windows ``[first_window, last_window)`` (prefetching)."""
        lo = self.offsets(self.step_of(first_window * self.seq))
        hi = self.offsets(self.step_of(last_window * self.seq + 1) + 1)
        return [o.shards_of(lo[i], hi[i]) if hi[i] > lo[i] else set()
                for i, o in enumerate(self.orders)]
