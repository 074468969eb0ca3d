"""Issue 21 item 2: shard basenames in ``index.json`` that leave the split folder (``../..``,
absolute paths) are refused before anything is read, decompressed or written. Before the reader
contract a zstd-compressed local split and an ``s3://`` split made ``data inspect`` write the
decompressed shard (and its ``.lock``) at the named path, outside the node cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sec_dataset_helpers import assert_refused, cli, edit_index, main_in_process, plain_split, tiny_layout


def _escapes(outside: Path) -> dict[str, str]:
    """Basenames aimed at ``outside/x.mds``: relative climbs (deep enough to leave any cache
    folder) and an absolute path."""
    climb = "../" * 12 + str(outside / "x.mds").lstrip("/")
    return {"climb": climb, "absolute": str(outside / "x.mds")}


def _aim(field: str, target: str):
    def change(index):
        shard = index["shards"][0]
        shard[field]["basename"] = target
    return change


def _nothing_written(outside: Path) -> None:
    assert not list(outside.iterdir()), f"written outside: {sorted(os.listdir(outside))}"


@pytest.mark.parametrize("form", ["climb", "absolute"])
@pytest.mark.parametrize("field", ["raw_data", "zip_data"])
def test_local_compressed_split_cannot_write_or_read_outside(tmp_path, form, field):
    root, outside = tmp_path / "ds", tmp_path / "outside"
    outside.mkdir()
    split = plain_split(root / "train", tiny_layout(), compression="zstd")
    target = _escapes(outside)[form]
    if field == "zip_data":  # the archive to read, planted outside
        (outside / "x.mds").write_bytes((split / "shard.00000.mds.zstd").read_bytes())
    edit_index(split, _aim(field, target))
    env = dict(os.environ, SODA_MEGA_CACHE=str(tmp_path / "cache" / "a" / "b"))
    line = assert_refused(cli("data", "inspect", str(root), env=env), str(split), field, "basename")
    assert "shard 0" in line or "shard.00000" in line
    if field == "zip_data":
        (outside / "x.mds").unlink()
    _nothing_written(outside)


@pytest.mark.parametrize("form", ["climb", "absolute"])
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_s3_split_cannot_write_outside_the_cache(s3_server, tmp_path, form, compression):
    root, outside = tmp_path / "ds", tmp_path / "outside"
    outside.mkdir()
    split = plain_split(root / "train", tiny_layout(), compression=compression)
    edit_index(split, _aim("raw_data", _escapes(outside)[form]))
    bucket = s3_server.new_bucket()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3_server.client.upload_file(str(path), bucket, f"ds/{path.relative_to(root)}")
    url = f"s3://{bucket}/ds"
    env = s3_server.env(dict(os.environ, SODA_MEGA_CACHE=str(tmp_path / "cache")))
    assert_refused(cli("data", "inspect", url, env=env), f"{url}/train", "raw_data", "basename")
    _nothing_written(outside)


@pytest.mark.parametrize("basename", ["shard.00000.mds/../../doc_lengths.npy", "", ".",
                                      "units/./shard.00000.mds", "index.json", "doc_lengths.npy",
                                      "shard.00000.mds.lock", "a\x00b.mds", "C:\\x.mds"])
def test_odd_basenames_are_refused(tmp_path, capsys, basename):
    root = tmp_path / "ds"
    split = plain_split(root / "train", tiny_layout())
    edit_index(split, _aim("raw_data", basename))
    assert_refused(main_in_process(capsys, "data", "inspect", str(root)), str(split), "raw_data", "basename")


def test_a_symlinked_shard_that_resolves_outside_is_refused(tmp_path, capsys):
    root = tmp_path / "ds"
    split = plain_split(root / "train", tiny_layout())
    shard = split / "shard.00000.mds"
    moved = tmp_path / "elsewhere.mds"
    shard.replace(moved)
    shard.symlink_to(moved)
    assert_refused(main_in_process(capsys, "data", "inspect", str(root)), str(split), "shard.00000.mds",
                   "outside")
