"""One split of a run's datasets, opened once and handed down to the orders, plans and loaders.

Opening a split is the expensive, checked part of reading: for every dataset of ``data.train``
(and ``data.valid`` for the valid split) its index, metadata and document lengths are read and
checked against the shard contract and the run's vocabulary layout, the per-shard token totals
are computed (or found in the node cache), and remote files are fetched into that cache
(:class:`.source.DocumentSource`). :func:`open_split` does all of that once per split and run;
an :class:`OpenedSplit` then serves everything built from it:

* the mixture weights of its streams (explicit ``data.weights`` for training, else by kind and
  token count, :func:`mixture_weights`);
* the stream orders (:class:`.order.StreamOrder`, one per dataset and ordering, kept), which the
  closed-form step plan and the sequential mixture plan walk;
* the counts a loader reports (documents too long for whole-document packing), computed once.

So a run's set-up walks down: config -> :func:`open_split` -> orders -> plan -> loader, and a
trainer that validates every N steps builds a fresh loader over the same opened valid split
instead of opening (and checking) the datasets again.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from soda_mega.config.schema import SodaConfig
from soda_mega.data.read.cache import NodeCache
from soda_mega.data.read.order import StreamOrder
from soda_mega.data.read.source import DatasetError, DocumentSource, EmptySplitError, MissingSplitError
from soda_mega.data.schema import SPLITS
from soda_mega.tokens.layout import VocabLayout


def mixture_weights(sources: Sequence[DocumentSource], explicit: Sequence[float],
                    text_fraction: float) -> list[float]:
    """Per-source weights: explicit ones, else ``text_fraction`` of tokens for text sources and
    the rest for speech sources, each group split by token count."""
    if explicit:
        return [float(w) for w in explicit]
    kinds = [s.kind for s in sources]
    tokens = [float(s.num_tokens) for s in sources]
    text_total = sum(t for t, k in zip(tokens, kinds) if k == "text")
    speech_total = sum(t for t, k in zip(tokens, kinds) if k != "text")
    if text_total == 0 or speech_total == 0:
        return tokens  # a single group: natural proportions
    return [t / text_total * text_fraction if k == "text" else t / speech_total * (1 - text_fraction)
            for t, k in zip(tokens, kinds)]


class OpenedSplit:
    """The opened datasets of one split: sources, node cache, layout, weights, orders."""

    def __init__(self, split: str, sources: Sequence[DocumentSource], layout: VocabLayout,
                 weights: Sequence[float], cache: NodeCache | None = None,
                 left_out: Sequence[str] = ()) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not sources:
            raise DatasetError(f"the {split} split has no datasets")
        self.split = split
        self.sources = list(sources)
        self.layout = layout
        self.weights = [float(w) for w in weights]
        self.cache = cache
        self.left_out = list(left_out)  # why datasets without this split were left out (skip_missing)
        self._orders: dict[tuple[int, int, bool], list[StreamOrder]] = {}
        self._too_long: dict[int, int] = {}

    @property
    def training(self) -> bool:
        return self.split == "train"

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sources)

    @property
    def num_documents(self) -> int:
        return sum(len(s) for s in self.sources)

    def datasets(self) -> list[dict]:
        """Identity of the datasets (name, split, index hash): saved with a loader state."""
        return [s.identity for s in self.sources]

    def orders(self, seed: int, window: int, shuffle: bool) -> list[StreamOrder]:
        """One :class:`StreamOrder` per source for this ordering, built on first use and kept
        (they only cache lookups; the plans that walk them hold their own positions)."""
        # NOTE: an unshuffled order does not depend on the seed: one set serves every caller.
        key = (seed if shuffle else 0, window, shuffle)
        found = self._orders.get(key)
        if found is None:
            found = [StreamOrder(s.lengths, s.shard_counts, key[0], i, window, shuffle=shuffle,
                                 totals=s.shard_tokens)
                     for i, s in enumerate(self.sources)]
            self._orders[key] = found
        return found

    def too_long(self, limit: int) -> int:
        """Documents longer than ``limit`` tokens over all sources (one pass, then kept)."""
        if limit not in self._too_long:
            self._too_long[limit] = sum(s.count_longer_than(limit) for s in self.sources)
        return self._too_long[limit]

    def close(self) -> None:
        """Let this process's background shard prefetches finish."""
        for source in self.sources:
            source.close()


def split_roots(cfg: SodaConfig, split: str) -> list[str]:
    """The dataset roots of ``split``: ``data.train`` (its valid splits too), plus ``data.valid``."""
    return list(cfg.data.train) + (list(cfg.data.valid) if split == "valid" else [])


def open_split(cfg: SodaConfig, split: str, layout: VocabLayout, *,
               skip_missing: bool = False, skip_empty: bool = False) -> OpenedSplit:
    """Open (and check against ``layout``) every dataset of ``split`` with one node cache
    configured by the ``data`` section.

    ``skip_missing`` (validation): a dataset without the split, or whose split holds no
    documents (a small build's valid split), is left out and named in ``left_out``;
    :class:`MissingSplitError` only when no dataset is left. ``skip_empty`` (evaluation): only a
    split that holds no documents is left out (:class:`EmptySplitError` when none is left); an
    absent one still fails. Any other problem still fails."""
    roots = split_roots(cfg, split)
    if not roots:
        raise DatasetError("data.train: no datasets given (build one with `soda-mega data build`)")
    data_cfg = cfg.data
    cache = NodeCache(data_cfg.cache_dir, data_cfg.cache_limit, data_cfg.download_timeout,
                      data_cfg.download_retries)
    sources, left_out = [], []
    for root in roots:
        try:
            sources.append(DocumentSource(root, split, layout, cache=cache, skip_bad=data_cfg.skip_bad_documents,
                                          prefetch_threads=data_cfg.prefetch_threads,
                                          max_bytes=data_cfg.max_dataset_bytes,
                                          max_inflate_ratio=data_cfg.max_inflate_ratio))
        except MissingSplitError as err:
            if not (skip_missing or (skip_empty and isinstance(err, EmptySplitError))):
                raise
            left_out.append(str(err))
    if not sources:
        raise (MissingSplitError if skip_missing else EmptySplitError)("; ".join(left_out))
    _warn_small_cache(sources, cache, data_cfg.shuffle_window)
    weights = mixture_weights(sources, data_cfg.weights if split == "train" else (),
                              data_cfg.text_fraction)
    return OpenedSplit(split, sources, layout, weights, cache, left_out)


def _warn_small_cache(sources: Sequence[DocumentSource], cache: NodeCache, shuffle_window: int) -> None:
    cached = [s for s in sources if s.remote or s.shards[0].get("compression")]
    if not (cache.limit and cached):
        return
    # The plan reads one block of shuffle_window shards per dataset and prefetches the next.
    window = shuffle_window or max(len(s.shards) for s in cached)
    need = sum(2 * min(window, len(s.shards)) * max(x["raw_data"]["bytes"] for x in s.shards)
               for s in cached)
    if cache.limit < need:
        print(f"[soda-mega data] data.cache_limit={cache.limit} is below the ~{need} bytes of "
              f"two blocks of data.shuffle_window={shuffle_window} shards per remote "
              "dataset: shards will be fetched again and again (raise the limit or lower "
              "the window)", file=sys.stderr, flush=True)
