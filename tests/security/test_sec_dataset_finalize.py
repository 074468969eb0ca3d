"""Issue 21: the reader contract also holds for ``data build --finalize``, which writes the
top-level ``index.json`` from the unit markers of every part (files a shared bucket or folder
may hold from anyone). A marker whose shard entries leave the split folder or declare a
``pkl`` column was merged into the dataset unchecked before; now the merge refuses it,
naming the unit, shard and field, and writes no index."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from sec_dataset_helpers import assert_refused, main_in_process

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from build_helpers import codes_corpus, tiny_config  # noqa: E402
from soda_mega.data.write.builder import build_dataset  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finalize")
    manifest = codes_corpus(tmp / "in", n=5)
    build_dataset(tmp / "out", [manifest], "speech", tiny_config(), show_progress=False)
    return tmp / "out"


def _pkl(shard):
    shard["column_encodings"][shard["column_names"].index("record_id")] = "pkl"


def _climb(shard):
    shard["raw_data"]["basename"] = "../../../../x.mds"


def _samples(shard):
    shard["samples"] = "many"


@pytest.mark.parametrize("change, words", [(_pkl, ["pkl", "column_encodings"]),
                                           (_climb, ["raw_data.basename"]),
                                           (_samples, ["samples"])], ids=["pkl", "climb", "samples"])
def test_finalize_refuses_a_hostile_marker(built, tmp_path, capsys, change, words):
    out = tmp_path / "out"
    shutil.copytree(built, out)
    marker = out / ".build" / "units" / "u000000.json"
    body = json.loads(marker.read_text())
    change(body["shards"]["train"][0])
    marker.write_text(json.dumps(body))
    proc = main_in_process(capsys, "data", "build", "--finalize", str(out))
    assert_refused(proc, "u000000", "shard 0", *words)
    assert not (out / "train" / "index.json").exists(), "a hostile index was written"
