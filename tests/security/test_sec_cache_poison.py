"""The node cache serves only what it wrote itself, from a folder only its user can write
(issue 32, item 2).

Before the fix, a decompressed shard planted at its cache key in ``$TMPDIR/soda-mega-<uid>``
(made by someone else, mode 0777) was shown by ``data inspect``, passed ``--verify`` ("OK") and
trained: a cached file was never re-hashed and the folder's owner and mode were not checked. A
planted ``*.lock`` symlink created a file outside the cache, and a cache-key folder that is a
symlink redirected writes elsewhere.

Each case plants one thing and runs ``data inspect`` (``--verify``) in this process: the planted
document is never shown, nothing is written outside the cache, and a refusal is exit 2 with one
line naming the folder or file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from sec_dataset_helpers import assert_refused, main_in_process, tiny_layout
from soda_mega.data.write.synthetic import write_split


def _docs(offset: int) -> list[np.ndarray]:
    """Four speech documents of fixed lengths; ``offset`` changes every audio id, not the sizes."""
    layout = tiny_layout()
    docs = []
    for i, length in enumerate((30, 41, 52, 63)):
        body = layout.audio_base + (np.arange(length) * 7 + i + offset) % (layout.size - layout.audio_base)
        docs.append(np.concatenate([[layout.bos_id], body, [layout.eos_id]]).astype(np.int32))
    return docs


def _dataset(root: Path, offset: int) -> Path:
    write_split(root / "train", tiny_layout(), _docs(offset), "speech", compression="zstd",
                size_limit=1 << 16, hashes=["xxh64"])
    return root


@pytest.fixture
def datasets(tmp_path):
    """(real dataset, the relative cache path of its decompressed shard, a planted shard of the
    same size holding other documents)."""
    real = _dataset(tmp_path / "real", 0)
    other = _dataset(tmp_path / "other", 5)
    # The cache key of each shard: where a private cache decompresses it.
    keys = {}
    for name, root in (("real", real), ("other", other)):
        from soda_mega.data.read.cache import NodeCache
        from soda_mega.data.read.source import DocumentSource

        cache = tmp_path / f"probe-{name}"
        src = DocumentSource(root, "train", cache=NodeCache(cache))
        shard = src.local_shard(0)
        keys[name] = (shard.relative_to(cache), shard.read_bytes())
    (rel, real_bytes), (_, planted) = keys["real"], keys["other"]
    assert len(planted) == len(real_bytes) and planted != real_bytes
    return real, rel, planted


def _ids(docs: list[np.ndarray]) -> str:
    return " ".join(str(int(i)) for i in docs[0][:12])


def _shows_real_document(out: str) -> bool:
    return _ids(_docs(0)) in out and _ids(_docs(5)) not in out


def test_cache_others_can_write_is_refused(datasets, tmp_path, monkeypatch, capsys):
    real, rel, planted = datasets
    tmp = tmp_path / "tmp"
    shared = tmp / f"soda-mega-{os.getuid()}"
    (shared / "data-cache" / rel).parent.mkdir(parents=True)
    (shared / "data-cache" / rel).write_bytes(planted)
    os.chmod(shared, 0o777)
    monkeypatch.delenv("SODA_MEGA_CACHE", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp))
    for args in (("data", "inspect", str(real)), ("data", "inspect", "--verify", str(real))):
        proc = main_in_process(capsys, *args)
        assert _ids(_docs(5)) not in proc.stdout
        line = assert_refused(proc, str(shared), "writable")
        assert "SODA_MEGA_CACHE" in line or "data.cache_dir" in line, line


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder of another user needs root")
def test_cache_of_another_user_is_refused(datasets, tmp_path, monkeypatch, capsys):
    real, rel, planted = datasets
    tmp = tmp_path / "tmp"
    shared = tmp / f"soda-mega-{os.getuid()}"
    (shared / "data-cache" / rel).parent.mkdir(parents=True)
    (shared / "data-cache" / rel).write_bytes(planted)
    os.chmod(shared, 0o700)
    os.chown(shared, 65534, 65534)
    monkeypatch.delenv("SODA_MEGA_CACHE", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp))
    proc = main_in_process(capsys, "data", "inspect", str(real))
    assert _ids(_docs(5)) not in proc.stdout
    assert_refused(proc, str(shared), "owned by")


def test_file_the_cache_did_not_write_is_never_served(datasets, tmp_path, monkeypatch, capsys):
    """A file at a cache key that the cache's own index does not hold (planted, or left by an
    older cache) is replaced by the real shard before anything reads it."""
    real, rel, planted = datasets
    cache = tmp_path / "cache"
    (cache / rel).parent.mkdir(parents=True)
    (cache / rel).write_bytes(planted)
    monkeypatch.setenv("SODA_MEGA_CACHE", str(cache))
    proc = main_in_process(capsys, "data", "inspect", str(real))
    assert proc.returncode == 0, proc.stderr
    assert _shows_real_document(proc.stdout), proc.stdout


def test_verify_rehashes_cached_shards(datasets, tmp_path, monkeypatch, capsys):
    """A cached shard changed after the cache wrote it (same size: the cheap check at first
    use cannot see it) is found by ``--verify``, named, and fetched again on its next use."""
    real, rel, planted = datasets
    cache = tmp_path / "cache"
    monkeypatch.setenv("SODA_MEGA_CACHE", str(cache))
    assert main_in_process(capsys, "data", "inspect", str(real)).returncode == 0
    os.chmod(cache / rel, 0o600)
    (cache / rel).write_bytes(planted)  # in place: the cache's index still lists it
    proc = main_in_process(capsys, "data", "inspect", "--verify", str(real))
    line = assert_refused(proc, rel.name, "cached")
    assert "OK" not in proc.stdout.splitlines()[-1], proc.stdout
    assert str(cache) in line or rel.name in line
    proc = main_in_process(capsys, "data", "inspect", str(real))
    assert proc.returncode == 0 and _shows_real_document(proc.stdout), proc.stdout + proc.stderr


def test_lock_symlink_creates_nothing_outside(datasets, tmp_path, monkeypatch, capsys):
    real, rel, _ = datasets
    cache = tmp_path / "cache"
    outside = tmp_path / "outside" / "created-by-the-cache"
    outside.parent.mkdir()
    lock = cache / rel.with_name(rel.name + ".lock")
    lock.parent.mkdir(parents=True)
    os.symlink(outside, lock)
    monkeypatch.setenv("SODA_MEGA_CACHE", str(cache))
    proc = main_in_process(capsys, "data", "inspect", str(real))
    assert not outside.exists()
    assert_refused(proc, str(lock), "symlink")


def test_cache_key_folder_symlink_redirects_nothing(datasets, tmp_path, monkeypatch, capsys):
    real, rel, _ = datasets
    cache = tmp_path / "cache"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache.mkdir()
    os.symlink(elsewhere, cache / rel.parts[0])
    monkeypatch.setenv("SODA_MEGA_CACHE", str(cache))
    proc = main_in_process(capsys, "data", "inspect", str(real))
    assert not list(elsewhere.iterdir())
    assert_refused(proc, str(cache / rel.parts[0]), "symlink")
