"""A dataset's index.json and soda_meta.json are read whole, so a planted giant one (local or on
object storage) is refused by its size before it is read or parsed: before this check a
multi-GB file was read into memory and handed to the JSON parser (issue 21 follow-up)."""

from __future__ import annotations

import pytest

from sec_dataset_helpers import assert_refused, main_in_process, plain_split, tiny_layout
from soda_mega.data import shard_contract
from soda_mega.data.schema import META_FILE
from soda_mega.data.shard_contract import INDEX_FILE


def _giant(path, size=shard_contract.MAX_JSON_BYTES + 1):
    with open(path, "wb") as f:  # sparse: costs no disk
        f.write(b"{")
        f.truncate(size)


@pytest.mark.parametrize("name", [INDEX_FILE, META_FILE])
def test_a_giant_local_metadata_file_is_refused_unread(tmp_path, capsys, name):
    root = tmp_path / "ds"
    split = plain_split(root / "train", tiny_layout())
    _giant(split / name)
    line = assert_refused(main_in_process(capsys, "data", "inspect", str(root)), str(split / name))
    assert f"{shard_contract.MAX_JSON_BYTES:,} at most" in line


def test_a_giant_remote_index_is_refused(s3_server, tmp_path, capsys, monkeypatch):
    # The limit is lowered for this test so that the planted index stays small to upload.
    monkeypatch.setattr(shard_contract, "MAX_JSON_BYTES", 4096)
    root = tmp_path / "ds"
    split = plain_split(root / "train", tiny_layout())
    index = split / INDEX_FILE
    index.write_bytes(index.read_bytes() + b" " * 8192)  # still valid JSON, only too large
    bucket = s3_server.new_bucket()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3_server.client.upload_file(str(path), bucket, f"ds/{path.relative_to(root)}")
    url = f"s3://{bucket}/ds"
    monkeypatch.setenv("SODA_MEGA_CACHE", str(tmp_path / "cache"))
    line = assert_refused(main_in_process(capsys, "data", "inspect", url), f"{url}/train/{INDEX_FILE}")
    assert "4,096 at most" in line
    assert not any(p.name == INDEX_FILE for p in (tmp_path / "cache").rglob("*")), \
        "a refused index was published into the cache"
