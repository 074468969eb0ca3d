"""`data build` writes verifiable shards and refuses useless outputs (issue 14, item 3, write side):
xxh64 hashes in every index, an empty train split is a failure, a truncated WAV is a bad record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from build_helpers import codes_corpus, tiny_config, tone, wav_bytes, write_manifest
from soda_mega.cli import main
from soda_mega.data.schema import SPLITS
from soda_mega.data.streaming_compat import streaming_module
from soda_mega.data.write.builder import BuildError, build_dataset
from soda_mega.data.write.inputs import InputError, read_audio


def test_shards_carry_xxh64_hashes_that_match_their_bytes(tmp_path):
    # NOTE: enough recordings that both splits hold some (the split hashes each recording's
    # key, here its codes file, against valid_fraction=0.3).
    manifest = codes_corpus(tmp_path / "in", n=10)
    out = tmp_path / "out"
    build_dataset(out, [manifest], "speech", tiny_config(), show_progress=False)
    get_hash = streaming_module("hashing").get_hash
    checked = 0
    for split in SPLITS:
        index = json.loads((out / split / "index.json").read_text())
        assert index["shards"]
        for shard in index["shards"]:
            assert shard["hashes"] == ["xxh64"]
            raw = shard["raw_data"]
            data = (out / split / raw["basename"]).read_bytes()
            assert raw["hashes"]["xxh64"] == get_hash("xxh64", data)
            checked += 1
    assert checked >= 2


def test_a_build_whose_records_are_all_bad_fails(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    manifest = write_manifest(src / "m.jsonl", [{"id": f"r{i}", "codes": f"missing{i}.npy", "transcript": "x"}
                                                for i in range(3)])
    with pytest.raises(BuildError, match="train split is empty.*3 records.*3 skipped"):
        build_dataset(tmp_path / "out", [manifest], "speech", tiny_config(), show_progress=False)
    assert not (tmp_path / "out" / "train" / "index.json").exists()  # never looks like a dataset
    rc = main(["data", "build", str(tmp_path / "cli"), "--manifest", str(manifest), "--preset", "tiny",
               "--quiet", "--data.build_workers=0"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "train split is empty" in err and "missing0.npy" in err


def test_a_build_with_an_empty_train_split_fails_even_when_valid_has_documents(tmp_path):
    manifest = codes_corpus(tmp_path / "in", n=2)
    with pytest.raises(BuildError, match="train split is empty.*data.valid_fraction"):
        build_dataset(tmp_path / "out", [manifest], "speech", tiny_config("--data.valid_fraction=0.99"),
                      show_progress=False)


def _truncated_wav(path: Path, seconds: float, keep_bytes: int) -> None:
    data = wav_bytes((tone(seconds, 16000) * 32767).astype("<i2"), 16000)
    path.write_bytes(data[:44 + keep_bytes])


def test_a_wav_shorter_than_its_header_is_a_bad_record(tmp_path):
    _truncated_wav(tmp_path / "cut.wav", 2.0, 100)
    with pytest.raises(InputError, match="cut.wav is truncated: its header says 2.000 s.*0.003 s"):
        read_audio(tmp_path / "cut.wav")
    # a complete file of the same kind reads fine
    (tmp_path / "ok.wav").write_bytes(wav_bytes((tone(0.5, 16000) * 32767).astype("<i2"), 16000))
    wav, rate = read_audio(tmp_path / "ok.wav")
    assert rate == 16000 and wav.shape == (1, 8000)


def test_a_truncated_wav_is_skipped_by_the_build(tmp_path):
    src = codes_corpus(tmp_path / "in", n=3).parent
    _truncated_wav(src / "cut.wav", 2.0, 100)
    lines = (src / "manifest.jsonl").read_text() + json.dumps(
        {"id": "cut", "audio": "cut.wav", "transcript": "a whole sentence"}) + "\n"
    (src / "manifest.jsonl").write_text(lines)
    out = tmp_path / "out"
    result = build_dataset(out, [src / "manifest.jsonl"], "speech", tiny_config("--data.valid_fraction=0"),
                           show_progress=False)
    assert [s["record"] for s in result.skipped] == ["cut (manifest.jsonl:4)"]
    assert "truncated" in result.skipped[0]["reason"]
    assert result.splits["train"]["num_records"] == 3 and result.splits["train"]["num_docs"] == 6
