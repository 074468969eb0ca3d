"""Issue 32 item 4 (shards): a compressed shard whose sizes are all consistent (index, archive,
``doc_lengths.npy``) but which inflates a few KB into a large file. Before: the shard was
inflated whole in memory (``zstd.decompress`` of a frame declaring 1 GiB, then read whole
again to check its hash) and left in the node cache: 3 such shards took 6.3 GB of memory and
left 3.1 GB of disk. Now it is inflated a chunk at a time (memory stays flat whatever it
declares), and a dataset whose shards inflate far beyond their archives, or declare more in
all than ``data.max_dataset_bytes``, is refused at open (exit 2, one line) before anything is
inflated.

The bomb is written by hand as a zstd frame of RLE blocks (a few KB, never built in memory):
an MDS shard holding one document of zeros (token 0 and mask 0 are valid values)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xxhash
import zstd

from sec_dataset_helpers import (
    REPO,
    assert_refused,
    cli,
    edit_index,
    edit_meta,
    main_in_process,
    plain_split,
    tiny_layout,
)
from soda_mega.data.read.cache import NodeCache
from soda_mega.data.read.source import DatasetError, DocumentSource
from soda_mega.data.schema import LENGTHS_FILE
from soda_mega.data.write.synthetic import write_split

TOKENS = 32 << 20  # tokens of the bomb's one document: 5 bytes each inflated, 160 MiB
_ZERO_CHUNK = 1 << 20


def _shard_parts(tokens: int, config: bytes) -> list[tuple[str, bytes | int]]:
    """One MDS shard of one document of ``tokens`` zero tokens, as ("raw", bytes) and ("zeros",
    count) runs: the sample count, two offsets, the writer's JSON ``config``, then the column
    sizes and the columns, sorted by name (doc_type, loss_mask, record_id, tokens). An ndarray
    of dynamic shape starts with ``ndim << 2 | shape dtype`` and its shape (streaming's NDArray)."""
    doc_type, record_id = b"speech_only", b"r0"
    code, dtype = next((c, d) for c, d in ((0, np.uint8), (1, np.uint16), (2, np.uint32))
                       if tokens <= np.iinfo(d).max)
    shape = bytes([1 << 2 | code]) + np.array([tokens], dtype).tobytes()
    sizes = [len(doc_type), len(shape) + tokens, len(record_id), len(shape) + 4 * tokens]
    first = 12 + len(config)
    head = np.array([1, first, first + 16 + sum(sizes)], np.uint32).tobytes() + config
    head += np.array(sizes, np.uint32).tobytes() + doc_type + shape
    return [("raw", head), ("zeros", tokens), ("raw", record_id + shape), ("zeros", 4 * tokens)]


def _zstd_frame(parts) -> bytes:
    """A zstd frame (RFC 8878) of raw and RLE blocks with its content size declared."""
    total = sum(len(x) if kind == "raw" else x for kind, x in parts)
    block_max = 1 << 17
    out = bytearray((0xFD2FB528).to_bytes(4, "little"))
    out += bytes([0xC0, 7 << 3])  # 8-byte content size, not single-segment; window 2^(10+7)
    out += total.to_bytes(8, "little")
    blocks = []
    for kind, x in parts:
        if kind == "raw":
            blocks.append((0, len(x), x))
        else:
            for start in range(0, x, block_max):
                blocks.append((1, min(block_max, x - start), b"\0"))
    for i, (btype, size, body) in enumerate(blocks):
        last = 1 if i == len(blocks) - 1 else 0
        out += (last | btype << 1 | size << 3).to_bytes(3, "little") + body
    return bytes(out)


def _xxh64_of(parts) -> str:
    h = xxhash.xxh64()
    zeros = bytes(_ZERO_CHUNK)
    for kind, x in parts:
        if kind == "raw":
            h.update(x)
        else:
            for start in range(0, x, _ZERO_CHUNK):
                h.update(zeros[:min(_ZERO_CHUNK, x - start)])
    return h.hexdigest()


def bomb_split(split_dir, tokens: int = TOKENS):
    """A zstd split whose one shard is the bomb, every size and hash consistent."""
    layout = tiny_layout()
    write_split(split_dir, layout, [np.zeros(4, np.int32)], "speech", compression="zstd",
                hashes=["xxh64"], masks=[np.zeros(4, np.uint8)])
    # The hand-made frame of the small document inflates to what MDSWriter wrote: same layout.
    small = zstd.decompress((split_dir / "shard.00000.mds.zstd").read_bytes())
    config = small[12:int(np.frombuffer(small[4:8], np.uint32)[0])]
    assert zstd.decompress(_zstd_frame(_shard_parts(4, config))) == small
    parts = _shard_parts(tokens, config)
    frame = _zstd_frame(parts)
    (split_dir / "shard.00000.mds.zstd").write_bytes(frame)

    def change(index):
        shard = index["shards"][0]
        shard["raw_data"]["bytes"] = sum(len(x) if k == "raw" else x for k, x in parts)
        shard["raw_data"]["hashes"]["xxh64"] = _xxh64_of(parts)
        shard["zip_data"]["bytes"] = len(frame)
        shard["zip_data"]["hashes"]["xxh64"] = xxhash.xxh64(frame).hexdigest()
    edit_index(split_dir, change)
    np.save(split_dir / LENGTHS_FILE, np.array([tokens], np.int64))
    edit_meta(split_dir, lambda m: m.update(tokens={"total": tokens}))
    return split_dir


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    root = tmp_path_factory.mktemp("zbomb") / "ds"
    bomb_split(root / "train")
    assert (root / "train" / "shard.00000.mds.zstd").stat().st_size < 8192
    return root


def test_a_consistent_bomb_inflates_in_flat_memory(bomb, tmp_path):
    """Inflating the shard (ratio check off) writes its 160 MiB to the cache with a few MB of
    memory: before, the whole shard was held (twice)."""
    code = textwrap.dedent(f"""
        import resource, sys
        from soda_mega.data.read.cache import NodeCache
        from soda_mega.data.read.source import DocumentSource
        src = DocumentSource({str(bomb)!r}, cache=NodeCache({str(tmp_path / 'cache')!r}),
                             max_inflate_ratio=None)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        path = src.local_shard(0)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(path.stat().st_size, (after - before) // 1024)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                                     str(REPO)])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    size, grown_mb = map(int, proc.stdout.split())
    assert 5 * TOKENS < size < 5 * TOKENS + 1024
    assert grown_mb < 24, f"inflating a {size >> 20} MiB shard grew the peak RSS by {grown_mb} MB"


def test_a_bomb_is_refused_at_open_by_its_inflate_ratio(bomb, tmp_path):
    env = dict(os.environ, SODA_MEGA_CACHE=str(tmp_path / "cache"))
    proc = cli("data", "inspect", str(bomb), env=env)
    line = assert_refused(proc, str(bomb / "train" / "index.json"), "shard 0 (shard.00000.mds)",
                          "raw_data.bytes", "data.max_inflate_ratio")
    assert "zip_data.bytes" in line
    big = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.stat().st_size > 1 << 20]
    assert not big, f"inflated bytes left in the cache: {big}"


def test_a_dataset_over_its_size_budget_is_refused_at_open(tmp_path):
    """A split whose shards declare more bytes in all than the budget (here lowered to a few
    KB) is refused before a shard is inflated or fetched; a budget it fits is read."""
    root = tmp_path / "ds"
    plain_split(root / "train", tiny_layout(), compression="zstd", n=40)
    total = sum(s["raw_data"]["bytes"] for s in json.loads((root / "train" / "index.json").read_text())["shards"])
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(DatasetError, match=rf"{root / 'train'}/index.json: raw_data.bytes: the shards "
                                           rf"inflate to {total:,} bytes in all, more than "
                                           r"data.max_dataset_bytes=1,000"):
        DocumentSource(root, cache=cache, max_bytes=1000)
    assert not list((tmp_path / "cache").rglob("shard.*"))
    src = DocumentSource(root, cache=cache, max_bytes=total)
    assert src.local_shard(0).is_file()


def test_the_budgets_are_config_fields(tmp_path):
    from soda_mega.config import load_config
    from soda_mega.data.read.split import open_split

    root = tmp_path / "ds"
    plain_split(root / "train", tiny_layout(), compression="zstd", n=40)
    cfg = load_config(preset="tiny", overrides=[f"--data.train=[{root}]", "--data.max_dataset_bytes=1000",
                                                f"--data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(DatasetError, match="data.max_dataset_bytes=1,000"):
        open_split(cfg, "train", tiny_layout())


def test_data_inspect_takes_the_budget_from_the_command_line(tmp_path, capsys, monkeypatch):
    root = tmp_path / "ds"
    plain_split(root / "train", tiny_layout(), compression="zstd", n=40)
    monkeypatch.setenv("SODA_MEGA_CACHE", str(tmp_path / "cache"))
    assert_refused(main_in_process(capsys, "data", "inspect", str(root), "--data.max_dataset_bytes=1000"),
                   f"{root / 'train'}/index.json", "data.max_dataset_bytes=1,000")
    assert main_in_process(capsys, "data", "inspect", str(root)).returncode == 0


def test_a_frame_that_asks_for_a_huge_window_is_refused_unallocated():
    """A single-segment frame's window is its whole content: 1 GiB declared is refused by
    libzstd (windowLogMax 27) before it allocates anything."""
    import io

    from soda_mega.data import zstd_stream
    from soda_mega.data.shard_contract import InflateError, inflate

    if not zstd_stream.available():
        pytest.skip("libzstd is not installed (frames are then inflated one at a time)")
    size = 1 << 30
    frame = (0xFD2FB528).to_bytes(4, "little") + bytes([0xE0]) + size.to_bytes(8, "little")
    frame += (1 | 1 << 1 | (1 << 17) << 3).to_bytes(3, "little") + b"\0"  # one RLE block, last
    out = io.BytesIO()
    with pytest.raises(InflateError, match="memory"):
        inflate("zstd", frame, out, size)
    assert out.tell() == 0


def test_without_libzstd_each_frame_is_checked_before_it_is_inflated(monkeypatch):
    import io

    from soda_mega.data import zstd_stream
    from soda_mega.data.shard_contract import InflateError, inflate

    monkeypatch.setattr(zstd_stream, "available", lambda: False)
    a, b = b"a" * 3000, b"b" * 5000
    out = io.BytesIO()
    inflate("zstd", zstd.compress(a) + zstd.compress(b), out, 8000)
    assert out.getvalue() == a + b
    with pytest.raises(InflateError, match="declare 8000 bytes, raw_data.bytes says 1000"):
        inflate("zstd", zstd.compress(a) + zstd.compress(b), io.BytesIO(), 1000)
