"""`data build`: MDS shards + soda_meta.json + doc_lengths.npy, splits, bad inputs, resume, workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from build_helpers import (
    codes_corpus,
    random_codes,
    read_split,
    read_split_streaming,
    tiny_config,
    tone,
    tree_bytes,
    wav_bytes,
    write_manifest,
)
from soda_mega.cli import main
from soda_mega.config import load_config
from soda_mega.config.fields import ConfigError
from soda_mega.data.schema import LENGTHS_FILE, META_FILE, META_KEYS, SPLITS
from soda_mega.data.write.builder import BuildError, build_dataset, split_of
from soda_mega.tokens.layout import Modality, VocabLayout


def _meta(root: Path, split: str) -> dict:
    return json.loads((root / split / META_FILE).read_text())


def _with_bad_records(tmp: Path) -> tuple[Path, dict[str, str]]:
    """The 7-recording codes corpus plus one bad line of each kind; returns expected reasons."""
    manifest = codes_corpus(tmp)
    np.save(tmp / "k4.npy", random_codes(1, 30, k=4))
    bad = np.asarray(random_codes(2, 30)).astype(np.int64)
    bad[3, 5] = 4096
    np.save(tmp / "range.npy", bad)
    np.save(tmp / "short.npy", random_codes(3, 10))  # 0.8 s of codes
    lines = manifest.read_text().splitlines() + [
        json.dumps({"id": "gone", "codes": "missing.npy", "transcript": "x"}),
        json.dumps({"id": "k4", "codes": "k4.npy", "transcript": "x"}),
        json.dumps({"id": "range", "codes": "range.npy", "transcript": "x"}),
        json.dumps({"id": "late", "codes": "short.npy",
                    "segments": [{"start": 0.0, "end": 0.5, "text": "ok"},
                                 {"start": 2.0, "end": 3.0, "text": "late"}]}),
        json.dumps({"id": "mute", "codes": "short.npy"}),
        json.dumps({"id": "rec0", "codes": "c0.npy", "transcript": "duplicate"}),
        "{broken json",
    ]
    manifest.write_text("\n".join(lines) + "\n")
    expected = {"gone": "codes file not found", "k4": "have 4 codebooks", "range": "outside [0, 2048)",
                "late": "starts after the end of the audio", "mute": "no transcript",
                "rec0 (manifest.jsonl:13)": "duplicate record id", "manifest.jsonl:14": "not valid JSON"}
    return manifest, expected


def test_speech_build_metadata_lengths_splits_and_skips(tmp_path):
    manifest, expected_skips = _with_bad_records(tmp_path / "in")
    cfg = tiny_config()
    layout = VocabLayout.from_config(cfg.vocab)
    out = tmp_path / "out"
    result = build_dataset(out, [manifest], "speech", cfg, show_progress=False)
    assert result.units == 6  # 13 readable lines / 2 per unit (the broken line is dropped at planning)

    seen_records: dict[str, str] = {}
    skipped = []
    for split in SPLITS:
        meta = _meta(out, split)
        assert set(META_KEYS) <= set(meta)
        assert meta["format"] == "soda-mega/1" and meta["split"] == split and meta["kind"] == "speech"
        assert meta["vocab_layout"] == layout.to_dict() and meta["vocab_fingerprint"] == layout.fingerprint()
        assert meta["codec"]["name"] == "precomputed" and meta["codec"]["random_init"] is False
        assert meta["tokenizer"]["kind"] == "byte"
        samples = read_split_streaming(out / split) if split == "train" else read_split(out / split)
        lengths = np.load(out / split / LENGTHS_FILE)
        assert lengths.dtype == np.int64 and lengths.tolist() == [len(s["tokens"]) for s in samples]
        # counts recomputed from the documents themselves
        tokens = np.concatenate([s["tokens"] for s in samples]) if samples else np.zeros(0, np.int32)
        mod = layout.modality(torch.from_numpy(tokens.astype(np.int64)))
        assert meta["num_docs"] == len(samples)
        assert meta["doc_types"] == ({"audio_first": len(samples) // 2, "text_first": len(samples) // 2}
                                     if samples else {})
        assert meta["tokens"] == {"total": len(tokens), "text": int((mod == Modality.TEXT).sum()),
                                  "special": int((mod == Modality.SPECIAL).sum()),
                                  "semantic": int((mod == Modality.SEMANTIC).sum()),
                                  "acoustic": int((mod >= Modality.ACOUSTIC).sum())}
        records = sorted({s["record_id"] for s in samples})
        frames = sum(40 + int(r[3:]) for r in records)
        assert meta["audio_hours"] == pytest.approx(frames / 12.5 / 3600)
        # both orders of a recording are adjacent, in this split, where the hash puts them
        for a, b in zip(samples[::2], samples[1::2]):
            assert a["record_id"] == b["record_id"] and (a["doc_type"], b["doc_type"]) == ("audio_first", "text_first")
            assert (a["loss_mask"] == 1).all()
        for r in records:
            # the split goes by recording: here the codes file rec<i> is read from
            assert r not in seen_records and split_of(f"c{r[3:]}.npy", 0.3) == split
            seen_records[r] = split
        skipped += meta["skipped"]
    assert sorted(seen_records) == [f"rec{i}" for i in range(7)]
    assert set(seen_records.values()) == {"train", "valid"}
    assert len(skipped) == len(expected_skips) == len(result.skipped)
    for record, reason in expected_skips.items():
        hits = [s for s in skipped if s["record"].startswith(record) and reason in s["reason"]]
        assert len(hits) == 1, (record, reason, skipped)


def _interrupt_after(n: int):
    def hook(name: str, completed: int) -> None:
        if completed == n:
            raise KeyboardInterrupt(f"simulated crash after {name}")
    return hook


def test_interrupted_build_resumes_to_the_same_bytes(tmp_path):
    manifest = codes_corpus(tmp_path / "in", n=9)
    cfg = tiny_config()
    clean = build_dataset(tmp_path / "a", [manifest], "speech", cfg, show_progress=False)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        build_dataset(out, [manifest], "speech", cfg, show_progress=False, on_unit_done=_interrupt_after(2))
    assert not (out / "train" / META_FILE).exists()  # never looks like a finished dataset
    # debris of a crash in the middle of later units
    (out / "train" / "units" / "u000002.tmp-999").mkdir(parents=True)
    (out / "train" / "units" / "u000002.tmp-999" / "shard.00000.mds").write_bytes(b"half")
    (out / "valid" / "units" / "u000003").mkdir(parents=True)  # renamed, marker never written
    first_marker = out / ".build" / "units" / "u000000.json"
    stamp = first_marker.stat().st_mtime_ns
    resumed = build_dataset(out, [manifest], "speech", cfg, show_progress=False)
    assert resumed.units == clean.units == 5 and resumed.units_resumed == 2
    assert first_marker.stat().st_mtime_ns == stamp  # finished work was not redone
    assert tree_bytes(out) == tree_bytes(tmp_path / "a")
    again = build_dataset(out, [manifest], "speech", cfg, show_progress=False)
    assert again.units_resumed == 5 and tree_bytes(out) == tree_bytes(tmp_path / "a")


def test_other_inputs_or_settings_are_refused(tmp_path):
    manifest = codes_corpus(tmp_path / "in", n=3)
    out = tmp_path / "out"
    build_dataset(out, [manifest], "speech", tiny_config(), show_progress=False)
    with pytest.raises(BuildError, match="valid_fraction.*--overwrite"):
        build_dataset(out, [manifest], "speech", tiny_config("--data.valid_fraction=0.5"), show_progress=False)
    result = build_dataset(out, [manifest], "speech", tiny_config("--data.valid_fraction=0.5"),
                           show_progress=False, overwrite=True)
    assert result.units_resumed == 0 and _meta(out, "train")["build"]["valid_fraction"] == 0.5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="not a soda-mega build folder"):
        build_dataset(tmp_path / "other", [manifest], "speech", tiny_config(), show_progress=False)


def test_worker_processes_give_the_same_output(tmp_path):
    manifest = codes_corpus(tmp_path / "in", n=6)
    build_dataset(tmp_path / "inline", [manifest], "speech", tiny_config(), show_progress=False)
    result = build_dataset(tmp_path / "pool", [manifest], "speech", tiny_config("--data.build_workers=2"),
                           show_progress=False)
    assert result.units == 3
    assert tree_bytes(tmp_path / "pool") == tree_bytes(tmp_path / "inline")


def test_text_build(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"Alpha one.\nstill alpha.\n\nBeta \xfe.\n\nGamma.\n\n" + b"Delta.\n\n" * 5)
    jsonl = write_manifest(tmp_path / "d.jsonl",
                           [{"text": "caf\u00e9", "id": "j1"}, {"txt": "no"}, "{", {"text": "ok"}])
    cfg = tiny_config("--data.valid_fraction=0.4", "--data.build_unit_text_docs=3")
    out = tmp_path / "out"
    result = build_dataset(out, [corpus, jsonl], "text", cfg, show_progress=False)
    assert result.units == 3 + 2
    metas = [_meta(out, s) for s in SPLITS]
    assert all(m["kind"] == "text" and m["codec"] is None and m["audio_hours"] == 0 for m in metas)
    assert sum(m["num_docs"] for m in metas) == 7 + 2  # 8 paragraphs and 4 lines, 3 of them bad
    assert sum(m["doc_types"].get("text_only", 0) for m in metas) == 9
    assert sum(m["tokens"]["text"] for m in metas) == sum(m["tokens"]["total"] for m in metas)
    skipped = sorted(s["record"] for m in metas for s in m["skipped"])
    assert skipped == ["c.txt:4", "d.jsonl:2", "d.jsonl:3"]
    docs = {s["record_id"]: s["tokens"].tolist() for split in SPLITS for s in read_split(out / split)}
    assert docs["j1"] == [256, *"café".encode(), 257]
    assert docs["c.txt:1"] == [256, *b"Alpha one.\nstill alpha.", 257]


def _wav(path: Path, seconds: float, rate: int, channels: int = 1) -> float:
    wav = tone(seconds, rate)
    data = np.stack([wav] * channels) if channels > 1 else wav
    path.write_bytes(wav_bytes((data * 32767).astype("<i2"), rate))
    return seconds


def test_speech_build_with_random_mimi(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    seconds = _wav(src / "a.wav", 1.6, 16000, channels=2) + _wav(src / "b.wav", 1.2, 24000) \
        + _wav(src / "c.wav", 0.9, 22050)
    (src / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    manifest = write_manifest(src / "m.jsonl", [
        {"id": "a", "audio": "a.wav", "segments": [{"start": 0.1, "end": 0.7, "text": "one"},
                                                   {"start": 0.9, "end": 1.5, "text": "two"}]},
        {"id": "b", "audio": "b.wav", "transcript": "three"},
        {"id": "c", "audio": "c.wav"},  # untranscribed: speech_only / semantic_only only
        {"id": "bad", "audio": "bad.wav", "transcript": "x"},
    ])
    cfg = tiny_config("--data.valid_fraction=0", "--data.encode_chunk_seconds=0.8",
                      "--data.doc_types=[audio_first, text_first, speech_only, semantic_only]")
    out = tmp_path / "out"
    build_dataset(out, [manifest], "speech", cfg, show_progress=False)
    meta = _meta(out, "train")
    assert meta["codec"]["name"] == "mimi" and meta["codec"]["random_init"] is True
    assert meta["codec"]["weights"] is None and meta["codec"]["seed"] == 0
    assert meta["audio_hours"] == pytest.approx(seconds / 3600, rel=1e-6)
    assert meta["doc_types"] == {"audio_first": 2, "text_first": 2, "speech_only": 3, "semantic_only": 3}
    assert [s["record"] for s in meta["skipped"]] == ["bad (m.jsonl:4)"]
    assert "cannot decode" in meta["skipped"][0]["reason"]
    samples = {(s["record_id"], s["doc_type"]): s["tokens"] for s in read_split(out / "train")}
    frames = {"a": 20, "b": 15, "c": 12}  # ceil(seconds * 12.5)
    for rec, t in frames.items():
        assert len(samples[(rec, "speech_only")]) == 4 + 8 * t
        assert len(samples[(rec, "semantic_only")]) == 4 + t
    # segment a/0 covers frames 1..9 (0.1 s .. 0.7 s) and a/1 frames 11..19
    assert len(samples[("a", "audio_first")]) == 2 + 2 * 4 + 8 * (8 + 8) + 3 + 3
    speech = samples[("a", "speech_only")][2:-2].reshape(-1, 8)
    assert samples[("a", "audio_first")][2:2 + 8 * 8].tolist() == speech[1:9].reshape(-1).tolist()


def test_doc_types_are_validated():
    with pytest.raises(ConfigError, match="data.doc_types: 'text_only'"):
        load_config(None, "tiny", ["--data.doc_types=[audio_first, text_only]"])
    with pytest.raises(ConfigError, match="data.doc_types"):
        load_config(None, "tiny", ["--data.doc_types=[]"])


def test_cli_build_help_and_run(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "soda_mega.cli", "data", "build", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--manifest FILE" in proc.stdout and "data demo" in proc.stdout
    corpus = tmp_path / "c.txt"
    corpus.write_text("one\n\ntwo\n\nthree\n")
    out = tmp_path / "out"
    assert main(["data", "build", str(out), "--text", str(corpus), "--preset", "tiny", "--quiet",
                 "--data.valid_fraction=0.5"]) == 0
    assert "built text dataset" in capsys.readouterr().out
    assert (out / "train" / META_FILE).is_file() and (out / "valid" / META_FILE).is_file()
    assert main(["data", "build", str(tmp_path / "x"), "--text", str(tmp_path / "none.txt"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "build", str(tmp_path / "y"), "--text", str(corpus), "--quiet",
                 "--data.doc_types=[bogus]"]) == 2
