"""Deterministic plan of packed training windows over a weighted mixture of document streams.

The plan works on document *lengths* only, so every data-parallel rank (and every loader
worker) can compute the whole global sequence of windows cheaply and then read just the
documents of its own windows.

* **Order within a stream**: a seeded, shard-aware order per epoch (:class:`.order.StreamOrder`:
  shuffled shards, documents shuffled within blocks of ``shuffle_window`` shards, computed
  lazily); a stream that runs out starts its next epoch, so training never stops for data.
* **Mixing by tokens**: the next document comes from the stream whose share of emitted tokens
  is furthest below its weight (``argmin emitted_i / weight_i``). Every stream's share stays
  within one document of its target at all times: the mixture holds over short horizons, not
  just in expectation.
* **Packing** (``whole_documents=False``, pretraining): documents are concatenated into one
  token stream cut into windows of ``seq_length + 1`` tokens with stride ``seq_length``
  (consecutive windows share one token, so every token is a label exactly once). A document
  longer than a window spans several.
* **Whole documents** (``whole_documents=True``, fine-tuning): a document is never cut. Each
  window takes documents in plan order while they fit and is filled up with a padding piece
  (:data:`PAD_STREAM`; loss mask 0); a document that does not fit starts the next window.
  Documents longer than a window are left out (the loader counts and reports them), so an
  S2ST pair never loses its source part to the previous window.

The whole state (cursors, emitted counts, the partly used documents, window index) is a small
JSON-able dict: saving it with a checkpoint resumes the exact same sequence. This sequential
plan serves validation (one pass) and whole-document packing; split-packed training uses the
closed-form :class:`.steps.StepPlan`, which jumps to any step without replaying.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from soda_mega.data.read.order import StreamOrder, read_range

# A piece of a window: (stream, document index, first token, end token) of that document.
Piece = tuple[int, int, int, int]
# Stream index of padding pieces (whole-document packing): (PAD_STREAM, -1, 0, n) is n pads.
PAD_STREAM = -1


@dataclass
class PlanState:
    window: int = 0                                     # index of the next window to plan
    epochs: list[int] = field(default_factory=list)    # current epoch of each stream
    positions: list[int] = field(default_factory=list)  # next position in that epoch's order
    emitted: list[int] = field(default_factory=list)   # tokens taken from each stream so far
    pending: list[Piece] = field(default_factory=list)  # pieces not yet fully consumed
    exhausted: bool = False                             # single-pass plans: no documents left

    def to_dict(self) -> dict:
        return {"window": self.window, "epochs": list(self.epochs),
                "positions": list(self.positions), "emitted": list(self.emitted),
                "pending": [list(p) for p in self.pending], "exhausted": self.exhausted}

    @classmethod
    def from_dict(cls, data: dict) -> PlanState:
        return cls(window=int(data["window"]), epochs=list(data["epochs"]),
                   positions=list(data["positions"]), emitted=list(data["emitted"]),
                   pending=[tuple(p) for p in data["pending"]], exhausted=bool(data["exhausted"]))


class MixturePlan:
    """Plans windows of ``window_tokens`` tokens, stride ``window_tokens - 1``."""

    def __init__(self, lengths: Sequence[np.ndarray], weights: Sequence[float],
                 window_tokens: int, seed: int, shuffle: bool = True,
                 single_pass: bool = False, whole_documents: bool = False,
                 shard_counts: Sequence[Sequence[int]] | None = None, shuffle_window: int = 0,
                 orders: Sequence[StreamOrder] | None = None) -> None:
        if len(lengths) != len(weights) or not lengths:
            raise ValueError("need one weight per stream and at least one stream")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {list(weights)}")
        if orders is not None and len(orders) != len(lengths):
            raise ValueError(f"{len(orders)} stream orders for {len(lengths)} streams")
        for i, lens in enumerate(lengths):
            # The orders know their token totals (from the opened split): no pass over lengths.
            if weights[i] > 0 and (len(lens) == 0 or (
                    orders[i].epoch_tokens if orders is not None else _total(lens)) == 0):
                raise ValueError(f"stream {i} has weight {weights[i]} but no tokens")
        if window_tokens < 2:
            raise ValueError("window_tokens must be >= 2 (seq_length + 1)")
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.lengths = list(lengths)
        self.window_tokens = window_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.single_pass = single_pass
        self.whole_documents = whole_documents
        if whole_documents:
            for i, lens in enumerate(self.lengths):
                if weights[i] > 0 and not _any_at_most(lens, window_tokens):
                    raise ValueError(f"stream {i}: every document is longer than a window of "
                                     f"{window_tokens} tokens; nothing to train on whole")
        if orders is None:
            orders = [StreamOrder(lens, None if shard_counts is None else shard_counts[i], seed, i,
                                  shuffle_window, shuffle) for i, lens in enumerate(self.lengths)]
        self.orders = list(orders)
        self.windows_planned = 0  # work counter (tests, benchmarks)
        n = len(lengths)
        self.state = PlanState(epochs=[0] * n, positions=[0] * n, emitted=[0] * n)

    # ------------------------------------------------------------------ documents
    def _next_document(self) -> Piece | None:
        st = self.state
        candidates = [i for i, w in enumerate(self.weights) if w > 0]
        if self.single_pass:
            candidates = [i for i in candidates if st.epochs[i] == 0]
        if not candidates:
            return None
        stream = min(candidates, key=lambda i: (st.emitted[i] / self.weights[i], i))
        order = self.orders[stream]
        doc = order.doc_at(st.epochs[stream], st.positions[stream])
        st.positions[stream] += 1
        if st.positions[stream] == order.num_docs:
            st.epochs[stream] += 1
            st.positions[stream] = 0
        length = int(self.lengths[stream][doc])
        if length == 0 or (self.whole_documents and length > self.window_tokens):
            return self._next_document()  # empty, or too long to be kept whole: left out
        st.emitted[stream] += length
        return (stream, doc, 0, length)

    # ------------------------------------------------------------------ windows
    def next_window(self) -> list[Piece] | None:
        """Pieces of the next window (``window_tokens`` tokens), or None when exhausted."""
        st = self.state
        if st.exhausted:
            return None
        self.windows_planned += 1
        if self.whole_documents:
            return self._next_whole_window()
        have = sum(p[3] - p[2] for p in st.pending)
        while have < self.window_tokens:
            piece = self._next_document()
            if piece is None:
                st.exhausted = True
                return None
            st.pending.append(piece)
            have += piece[3] - piece[2]
        window: list[Piece] = []
        need = self.window_tokens
        for s, d, a, b in st.pending:
            take = min(need, b - a)
            window.append((s, d, a, a + take))
            need -= take
            if need == 0:
                break
        self._advance(self.window_tokens - 1)
        st.window += 1
        return window

    def _next_whole_window(self) -> list[Piece] | None:
        """Whole documents while they fit, then padding; the misfit waits in ``pending``."""
        st = self.state
        window: list[Piece] = []
        room = self.window_tokens
        while True:
            piece = st.pending.pop(0) if st.pending else self._next_document()
            if piece is None:
                if not window:
                    st.exhausted = True
                    return None
                break
            size = piece[3] - piece[2]
            if size > room:
                st.pending.insert(0, piece)
                break
            window.append(piece)
            room -= size
            if room == 0:
                break
        if room:
            window.append((PAD_STREAM, -1, 0, room))
        st.window += 1
        return window

    def _advance(self, tokens: int) -> None:
        """Drop ``tokens`` tokens from the front of the pending pieces."""
        pending = self.state.pending
        while tokens:
            s, d, a, b = pending[0]
            take = min(tokens, b - a)
            tokens -= take
            if a + take == b:
                pending.pop(0)
            else:
                pending[0] = (s, d, a + take, b)

    def skip(self, windows: int) -> None:
        for _ in range(windows):
            if self.next_window() is None:
                return

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, data: dict) -> None:
        state = PlanState.from_dict(data)
        if len(state.epochs) != len(self.lengths):
            raise ValueError(f"saved loader state has {len(state.epochs)} streams, "
                             f"this mixture has {len(self.lengths)}")
        self.state = state

    def clone(self) -> MixturePlan:
        twin = copy.copy(self)
        twin.state = PlanState.from_dict(self.state.to_dict())
        return twin


def _total(lengths, chunk: int = 1 << 22) -> int:
    return sum(int(read_range(lengths, a, a + chunk).sum())
               for a in range(0, len(lengths), chunk))


def _any_at_most(lengths, limit: int, chunk: int = 1 << 22) -> bool:
    return any(bool((read_range(lengths, a, a + chunk) <= limit).any())
               for a in range(0, len(lengths), chunk))
