"""The node cache without a network: atomic publish, stale temporaries, LRU eviction."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from soda_mega.data.read.cache import CacheError, NodeCache


def test_publish_is_verified_atomic_and_clears_stale_temporaries(tmp_path):
    cache = NodeCache(tmp_path)
    target = tmp_path / "d" / "shard.00000.mds"
    target.parent.mkdir()
    stale = target.with_name(target.name + ".otherhost.123.abcd1234.tmp")
    stale.write_bytes(b"half a file from a killed process")
    from soda_mega.data.streaming_compat import streaming_module

    good = streaming_module("hashing").get_hash("xxh64", b"data")
    with pytest.raises(CacheError, match="xxh64 hash"):
        cache.publish(target, lambda t: t.write_bytes(b"dat4"), {"xxh64": good}, what="s3://b/shard")
    assert not target.exists() and not stale.exists()
    cache.publish(target, lambda t: t.write_bytes(b"data"), {"xxh64": good})
    assert target.read_bytes() == b"data" and (cache.misses, cache.hits) == (1, 0)
    cache.publish(target, lambda t: pytest.fail("published files are not made again"))
    assert cache.hits == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_eviction_removes_least_recently_used_shards_only(tmp_path):
    cache = NodeCache(tmp_path, limit=250)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "doc_lengths.npy").write_bytes(b"x" * 1000)  # metadata: never evicted
    for i in range(2):
        cache.publish(tmp_path / "d" / f"shard.{i:05d}.mds", lambda t: t.write_bytes(b"y" * 100))
        past = time.time() - 100 + i
        os.utime(tmp_path / "d" / f"shard.{i:05d}.mds", (past, past))
    cache.publish(tmp_path / "d" / "shard.00000.mds", lambda t: None)  # a hit: now most recent
    cache.publish(tmp_path / "d" / "shard.00002.mds", lambda t: t.write_bytes(b"z" * 100))
    left = sorted(p.name for p in (tmp_path / "d").glob("shard.*.mds"))
    assert left == ["shard.00000.mds", "shard.00002.mds"], left
    assert cache.evicted == 1
    assert (tmp_path / "d" / "doc_lengths.npy").exists() and cache.usage() <= 250


def _publish_many(args):
    root, limit, seed = args
    import random

    cache = NodeCache(root, limit=limit)
    rng = random.Random(seed)
    for _ in range(30):
        name = f"shard.{rng.randrange(12):05d}.mds"
        path = cache.publish(Path(root) / "d" / name, lambda t, n=name: t.write_bytes(n.encode() * 10))
        try:
            assert path.read_bytes() == name.encode() * 10
        except FileNotFoundError:  # evicted by another process meanwhile: fetched again on use
            pass
    return cache.misses, cache.evicted


def test_processes_publishing_and_evicting_together_keep_the_index_whole(tmp_path):
    """Ranks of one node publish and evict in one cache at once: every file left has its entry
    and its bytes, no entry outlives its file, no temporary stays, and the limit holds."""
    root = tmp_path / "cache"
    limit = 5 * 150
    with mp.get_context("spawn").Pool(4) as pool:
        counts = pool.map(_publish_many, [(str(root), limit, seed) for seed in range(4)])
    assert sum(m for m, _ in counts) >= 12 and sum(e for _, e in counts) > 0
    cache = NodeCache(root, limit=limit)
    cache.evict()
    entries = {str(path) for _, path, _, _ in cache._entries()}
    files = {str(p) for p in (root / "d").glob("shard.*.mds")}
    assert entries == files and cache.usage() <= limit
    assert all(Path(f).read_bytes() == Path(f).name.encode() * 10 for f in files)
    assert not list(root.rglob("*.tmp"))
