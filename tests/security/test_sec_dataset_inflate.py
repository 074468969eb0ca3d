"""Bounded inflation of compressed shards (issue 21 item 3), codec by codec: every compression
soda-mega reads gives the documents of the uncompressed split, a shard that inflates past its
declared ``raw_data.bytes`` stops within one chunk of it, and compressions it cannot bound are
refused at open, by name."""

from __future__ import annotations

import bz2
import gzip
import io

import numpy as np
import pytest
import zstd

from sec_dataset_helpers import edit_index, tiny_layout
from soda_mega.data.read.source import DatasetError, DocumentSource
from soda_mega.data.shard_contract import InflateError, inflate
from soda_mega.data.write.synthetic import random_docs, write_split

COMPRESS = {"zstd": lambda b: zstd.compress(b, 3), "gz": gzip.compress, "bz2": bz2.compress}
LIMIT = 1 << 20  # inflate writes output a chunk (1 MiB) at a time


@pytest.mark.parametrize("algo", ["zstd", "gz", "bz2", "zstd:7"])
def test_every_read_compression_gives_the_plain_documents(tmp_path, algo):
    layout = tiny_layout()
    docs = random_docs(layout, 40, 10, 200, 5, "speech")
    write_split(tmp_path / "plain" / "train", layout, docs, "speech")
    write_split(tmp_path / "packed" / "train", layout, docs, "speech", compression=algo,
                hashes=["xxh64"], size_limit=1 << 11)
    plain = DocumentSource(tmp_path / "plain")
    packed = DocumentSource(tmp_path / "packed")
    assert len(packed.shards) > 1
    for i in range(len(docs)):
        np.testing.assert_array_equal(packed.get(i)[0], plain.get(i)[0])


@pytest.mark.parametrize("algo", sorted(COMPRESS))
def test_a_bomb_stops_one_chunk_past_the_declared_size(algo):
    bomb = COMPRESS[algo](bytes(64 << 20))
    out = io.BytesIO()
    with pytest.raises(InflateError, match=r"raw_data\.bytes.*1000"):
        inflate(algo, bomb, out, 1000)
    assert out.tell() <= LIMIT, f"{out.tell()} bytes inflated"


@pytest.mark.parametrize("algo", sorted(COMPRESS))
def test_short_damaged_and_multi_member_archives(algo):
    a, b = b"a" * 3000, b"b" * 5000
    two = COMPRESS[algo](a) + COMPRESS[algo](b)
    out = io.BytesIO()
    inflate(algo, two, out, len(a) + len(b))
    assert out.getvalue() == a + b
    with pytest.raises(InflateError, match="8000 bytes, raw_data.bytes says 9000|declare 8000"):
        inflate(algo, two, io.BytesIO(), 9000)
    with pytest.raises(InflateError):
        inflate(algo, two[:-7], io.BytesIO(), len(a) + len(b))


@pytest.mark.parametrize("algo", ["br", "snappy", "zstd:99"])
def test_compressions_without_a_bounded_reader_are_refused(tmp_path, algo):
    layout = tiny_layout()
    split = write_split(tmp_path / "ds" / "train", layout, random_docs(layout, 6, 10, 50, 1, "speech"),
                        "speech", compression="zstd")

    def change(index):
        for shard in index["shards"]:
            shard["compression"] = algo
            shard["zip_data"]["basename"] = shard["raw_data"]["basename"] + "." + algo.split(":")[0]
    edit_index(split, change)
    with pytest.raises(DatasetError, match=rf"shard 0 \(shard\.00000\.mds\): compression: .*{algo}"):
        DocumentSource(tmp_path / "ds")
