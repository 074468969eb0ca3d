"""The embedded demo corpus: shipped assets, espeak-ng synthesis and the fallback WAVs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soda_mega.data.schema import META_FILE, SPLITS
from soda_mega.data.write.demo import FALLBACK, TEXT_CORPUS, build_demo, demo_config, espeak_binary, read_sentences
from soda_mega.data.write.inputs import read_audio, read_manifest


def test_shipped_assets():
    sentences = read_sentences()
    assert 150 <= len(sentences) <= 300 and len(set(sentences)) == len(sentences)
    size = TEXT_CORPUS.stat().st_size
    assert 30_000 <= size <= 100_000
    TEXT_CORPUS.read_text(encoding="utf-8")
    wavs = sorted(FALLBACK.glob("*.wav"))
    assert wavs and sum(w.stat().st_size for w in wavs) < 1.5e6
    recs, skipped = read_manifest(FALLBACK / "manifest.jsonl")
    assert not skipped and len(recs) == len(wavs)
    for rec in recs:
        wav, rate = read_audio(rec.audio)
        assert wav.shape[0] == 1 and rate == 16000
        assert rec.segments[-1].end <= wav.shape[1] / rate


def _check(results, out, recordings):
    speech, text = results
    assert speech.kind == "speech" and text.kind == "text"
    metas = {kind: [json.loads((out / kind / s / META_FILE).read_text()) for s in SPLITS]
             for kind in ("speech", "text")}
    assert sum(m["num_records"] for m in metas["speech"]) == recordings
    assert all(m["codec"]["random_init"] for m in metas["speech"])
    assert sum(m["num_docs"] for m in metas["text"]) == 107 == text.records
    assert all(m["build"]["valid_fraction"] == 0.1 for m in metas["speech"] + metas["text"])
    assert all(not m["skipped"] for m in metas["speech"] + metas["text"])
    return metas


def test_demo_with_the_shipped_wavs(tmp_path, capsys):
    cfg = demo_config(overrides=["--data.build_workers=0"])
    assert cfg.vocab.text_vocab_size == 258  # the tiny preset
    results = build_demo(tmp_path, cfg, limit=3, use_espeak=False, show_progress=False)
    assert "shipped" in capsys.readouterr().err
    metas = _check(results, tmp_path, recordings=1)
    hours = sum(m["audio_hours"] for m in metas["speech"])
    wav, rate = read_audio(FALLBACK / "fallback_0.wav")
    assert hours == pytest.approx(wav.shape[1] / rate / 3600)


@pytest.mark.skipif(espeak_binary() is None, reason="espeak-ng is not installed")
def test_demo_with_espeak(tmp_path):
    cfg = demo_config(overrides=["--data.build_workers=0"])
    results = build_demo(tmp_path, cfg, limit=2, show_progress=False)
    _check(results, tmp_path, recordings=1)
    recs, _ = read_manifest(tmp_path / "sources" / "manifest.jsonl")
    assert [s.text for s in recs[0].segments] == read_sentences(limit=2)
    wav = tmp_path / "sources" / "rec_0000.wav"
    stamp = wav.stat().st_mtime_ns
    again = build_demo(tmp_path, cfg, limit=2, show_progress=False)
    assert wav.stat().st_mtime_ns == stamp  # synthesis is cached
    assert again[0].units_resumed == again[0].units


def test_the_shipped_wavs_split_alike_wherever_soda_mega_is_installed(tmp_path):
    """The copy of the fallback manifest names its audio by absolute path (the install's own
    folder): its recordings are split by the name the shipped manifest gives them, so that the
    split is the same in every checkout (it once depended on the folder's path)."""
    from soda_mega.data.write.demo import fallback_manifest

    shipped = [json.loads(line) for line in (FALLBACK / "manifest.jsonl").read_text().splitlines()]
    copy = [json.loads(line) for line in fallback_manifest(tmp_path, limit=6).read_text().splitlines()]
    assert [r["recording_id"] for r in copy] == [r["audio"] for r in shipped[:len(copy)]]
    assert all(Path(r["audio"]).is_absolute() for r in copy)
