"""Issue 21 items 4 and 5: index.json, soda_meta.json and doc_lengths.npy of the wrong types
or out of range are named (dataset, shard, field) with exit 2 and one line, never a
traceback; and ``data inspect`` says what is wrong with a malformed train split instead of
only that there is none. Each case below tracebacked, or was reported as a missing split,
before the reader contract."""

from __future__ import annotations

import numpy as np
import pytest

from sec_dataset_helpers import assert_refused, cli, edit_index, edit_meta, main_in_process, plain_split, tiny_layout
from soda_mega.data.schema import LENGTHS_FILE


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A valid two-split dataset (two shards per split) to copy and damage."""
    root = tmp_path_factory.mktemp("pristine") / "ds"
    layout = tiny_layout()
    plain_split(root / "train", layout, n=24)
    plain_split(root / "valid", layout, split="valid", n=6)
    return root


def _copy(pristine, tmp_path):
    import shutil

    dst = tmp_path / "ds"
    shutil.copytree(pristine, dst)
    return dst


def _shard(i, change):
    def edit(index):
        change(index["shards"][i])
    return edit


INDEX_CASES = {
    # name: (edit of index.json, words the one line must hold besides the split folder)
    "samples_string": (_shard(0, lambda s: s.__setitem__("samples", "abc")), ["shard 0", "samples"]),
    "samples_negative": (_shard(1, lambda s: s.__setitem__("samples", -3)), ["shard 1", "samples"]),
    "samples_bool": (_shard(0, lambda s: s.__setitem__("samples", True)), ["shard 0", "samples"]),
    "shard_is_string": (lambda idx: idx["shards"].__setitem__(0, "shard.00000.mds"), ["shard 0"]),
    "shards_not_list": (lambda idx: idx.__setitem__("shards", {"a": 1}), ["shards"]),
    "no_raw_data": (_shard(0, lambda s: s.pop("raw_data")), ["shard 0", "raw_data"]),
    "raw_data_string": (_shard(0, lambda s: s.__setitem__("raw_data", "x")), ["shard 0", "raw_data"]),
    "compression_without_zip": (_shard(0, lambda s: s.__setitem__("compression", "zstd")),
                                ["shard.00000.mds", "zip_data"]),
    "unknown_compression": (_shard(0, lambda s: (s.__setitem__("compression", "lzma"),
                                                 s.__setitem__("zip_data", {"basename": "shard.00000.mds.lzma",
                                                                            "bytes": 10, "hashes": {}}))),
                            ["shard.00000.mds", "compression"]),
    "integer_basename": (_shard(0, lambda s: s["raw_data"].__setitem__("basename", 7)),
                         ["shard 0", "raw_data.basename"]),
    "bytes_string": (_shard(0, lambda s: s["raw_data"].__setitem__("bytes", "12")),
                     ["shard.00000.mds", "raw_data.bytes"]),
    "bytes_past_the_documents": (_shard(0, lambda s: s["raw_data"].__setitem__("bytes", 1 << 30)),
                                 ["shard.00000.mds", "raw_data.bytes"]),
    "hashes_list": (_shard(0, lambda s: s["raw_data"].__setitem__("hashes", ["xxh64"])),
                    ["shard.00000.mds", "raw_data.hashes"]),
    "unknown_hash": (_shard(0, lambda s: s["raw_data"].__setitem__("hashes", {"md17": "00"})),
                     ["shard.00000.mds", "raw_data.hashes"]),
    "version": (_shard(0, lambda s: s.__setitem__("version", "2")), ["shard.00000.mds", "version"]),
    "column_sizes": (_shard(0, lambda s: s.__setitem__("column_sizes", [4, None, None, None])),
                     ["shard.00000.mds", "column_sizes"]),
    "unknown_key": (_shard(0, lambda s: s.__setitem__("exec", "rm -rf /")), ["shard.00000.mds", "exec"]),
    "index_is_list": (lambda idx: [idx], ["index.json"]),
    "duplicate_basename": (lambda idx: idx["shards"][1]["raw_data"].__setitem__(
        "basename", idx["shards"][0]["raw_data"]["basename"]), ["shard 1", "basename"]),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_malformed_index_is_named(pristine, tmp_path, capsys, case):
    root = _copy(pristine, tmp_path)
    change, words = INDEX_CASES[case]
    edit_index(root / "train", change)
    line = assert_refused(main_in_process(capsys, "data", "inspect", str(root)), str(root / "train"), *words)
    assert "no 'train' split" not in line


META_CASES = {
    "num_docs": ("num_docs", "many"),
    "tokens_list": ("tokens", [1, 2]),
    "tokens_value": ("tokens", {"total": "x"}),
    "doc_types": ("doc_types", {"speech_only": -1}),
    "audio_hours": ("audio_hours", "long"),
    "audio_hours_nan": ("audio_hours", float("nan")),
    "skipped": ("skipped", {"record": 1}),
    "skipped_entry": ("skipped", ["bad record"]),
    "split": ("split", 5),
    "kind": ("kind", ["speech"]),
    "vocab_layout": ("vocab_layout", "tiny"),
    "vocab_layout_field": ("vocab_layout", {"text_vocab_size": "258"}),
    "codec": ("codec", "mimi"),
    "codec_field": ("codec", {"name": "mimi", "sample_rate": "24000", "frame_rate": 12.5,
                              "num_codebooks": 8, "codebook_size": 2048, "weights": None,
                              "weights_sha256": None, "random_init": True}),
    "tokenizer": ("tokenizer", "byte"),
    "tokenizer_path": ("tokenizer", {"kind": "hf", "path": 3, "sha256": None}),
    "fingerprint": ("vocab_fingerprint", 12),
    "format": ("format", {"v": 1}),
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_malformed_meta_is_named(pristine, tmp_path, capsys, case):
    root = _copy(pristine, tmp_path)
    key, value = META_CASES[case]
    edit_meta(root / "train", lambda m: m.__setitem__(key, value))
    line = assert_refused(main_in_process(capsys, "data", "inspect", str(root)), str(root / "train"),
                          "soda_meta.json", key)
    assert "no 'train' split" not in line


@pytest.mark.parametrize("case", ["all_negative", "huge", "float", "two_d"])
def test_malformed_doc_lengths_are_named(pristine, tmp_path, capsys, case):
    root = _copy(pristine, tmp_path)
    path = root / "train" / LENGTHS_FILE
    lengths = np.load(path)
    bad = {"all_negative": -lengths, "huge": np.full_like(lengths, 1 << 40),
           "float": lengths.astype(np.float64), "two_d": lengths.reshape(2, -1)}[case]
    np.save(path, bad)
    line = assert_refused(main_in_process(capsys, "data", "inspect", str(root)), str(root / "train"),
                          LENGTHS_FILE)
    assert "no 'train' split" not in line


def test_malformed_train_split_is_named_by_inspect_and_verify(pristine, tmp_path):
    """Item 5: the reason, not 'no train split'."""
    root = _copy(pristine, tmp_path)
    edit_index(root / "train", _shard(0, lambda s: s.__setitem__("samples", "abc")))
    for args in ((), ("--verify",)):
        proc = cli("data", "inspect", str(root), *args)
        assert_refused(proc, str(root / "train"), "samples")
        assert "has no 'train' split" not in proc.stdout + proc.stderr
