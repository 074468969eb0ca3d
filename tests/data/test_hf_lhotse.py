"""`data build --hf-dataset` / `--lhotse`: the same documents as the equivalent JSONL manifest.

Tiny synthetic clips (tones at 24 and 16 kHz) are written as WAV files with a JSONL manifest,
as a Hugging Face `save_to_disk` folder and parquet file (the audio as WAV bytes inside Arrow),
and as Lhotse manifests (cuts of one longer recording); every build runs the random-init Mimi on
CPU and the built shards' documents are compared token for token.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import datasets
import huggingface_hub
import lhotse
import numpy as np
import pytest

from build_helpers import read_split, tiny_config, tone, wav_bytes, write_manifest
from soda_mega.cli import main
from soda_mega.data.schema import META_FILE, SPLITS
from soda_mega.data.write.builder import BuildError, build_dataset
from soda_mega.data.write.hf_input import HFSource, files_fingerprint, offline
from soda_mega.data.write.inputs import AudioSlice, InputError, SourceError, load_audio, read_audio, read_manifest
from soda_mega.data.write.lhotse_input import LhotseSource

# id -> (seconds, sample rate, tone Hz, transcript); "a" lands in train, "b" and "c" in valid
# at valid_fraction=0.3 (split_of), so both splits are compared.
CLIPS = {"a": (0.8, 24000, 220.0, "alpha"), "b": (0.64, 24000, 330.0, "beta"),
         "c": (0.72, 16000, 440.0, "gamma")}
BAD_BYTES = b"RIFF\x24\x00\x00\x00WAVEjunk"


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """The datasets library's cache (parquet -> arrow) inside the test's folder."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    # and an empty hub cache: what this machine may have downloaded does not count
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def _pcm(seconds: float, rate: int, freq: float) -> np.ndarray:
    return (tone(seconds, rate, freq) * 32767).astype("<i2")


def _cfg():
    return tiny_config("--data.valid_fraction=0.3", "--data.encode_chunk_seconds=0.8")


def _docs(root: Path) -> dict[tuple, list[int]]:
    """(split, record id, doc type) -> tokens of every document of a built dataset."""
    return {(split, s["record_id"], s["doc_type"]): s["tokens"].tolist()
            for split in SPLITS for s in read_split(root / split)}


def _skipped(root: Path) -> list[dict]:
    return [s for split in SPLITS for s in json.loads((root / split / META_FILE).read_text())["skipped"]]


def _wav_corpus(src: Path) -> Path:
    """The clips as WAV files + manifest (with the bad rows of the HF dataset as bad lines)."""
    src.mkdir(parents=True, exist_ok=True)
    lines = []
    for rid, (sec, rate, freq, text) in CLIPS.items():
        (src / f"{rid}.wav").write_bytes(wav_bytes(_pcm(sec, rate, freq), rate))
        # the rows' recordings, as the HF dataset (one row, one recording) splits them
        lines.append({"id": rid, "audio": f"{rid}.wav", "recording_id": rid, "transcript": text})
    (src / "bad.wav").write_bytes(BAD_BYTES)
    lines += [{"id": "bad", "audio": "bad.wav", "transcript": "undecodable"},
              {"id": "mute", "audio": "a.wav", "transcript": ""}]
    return write_manifest(src / "manifest.jsonl", lines)


def _hf_dataset(src: Path) -> datasets.Dataset:
    """The same rows as a Dataset with an Audio column holding WAV bytes."""
    ids, audio, texts = [], [], []
    for rid, (sec, rate, freq, text) in CLIPS.items():
        ids.append(rid)
        audio.append({"bytes": wav_bytes(_pcm(sec, rate, freq), rate), "path": f"{rid}.wav"})
        texts.append(text)
    ids += ["bad", "mute"]
    audio += [{"bytes": BAD_BYTES, "path": "bad.wav"}, audio[0]]
    texts += ["undecodable", ""]
    ds = datasets.Dataset.from_dict({"id": ids, "audio": audio, "text": texts})
    return ds.cast_column("audio", datasets.Audio())  # storage cast: no torchcodec needed


def test_hf_dataset_builds_the_manifest_documents(tmp_path):
    manifest = _wav_corpus(tmp_path / "wavs")
    ds = _hf_dataset(tmp_path)
    ds.save_to_disk(str(tmp_path / "ls_tiny"))
    ds.to_parquet(str(tmp_path / "ls_tiny.parquet"))
    cfg = _cfg()

    build_dataset(tmp_path / "ref", [manifest], "speech", cfg, show_progress=False)
    ref = _docs(tmp_path / "ref")
    assert {k[:2] for k in ref} == {("train", "a"), ("valid", "b"), ("valid", "c")}

    folder = build_dataset(tmp_path / "disk", [HFSource(str(tmp_path / "ls_tiny"))], "speech", cfg,
                           show_progress=False)
    assert _docs(tmp_path / "disk") == ref
    skipped = {s["record"]: s["reason"] for s in _skipped(tmp_path / "disk")}
    assert set(skipped) == {"bad (ls_tiny:row 3)", "mute (ls_tiny:row 4)"}
    assert "cannot decode audio of row 3 (bad.wav)" in skipped["bad (ls_tiny:row 3)"]
    assert "non-empty string" in skipped["mute (ls_tiny:row 4)"]
    assert len(_skipped(tmp_path / "ref")) == len(skipped) == 2

    # parquet on the device path (2 fake GPUs): spawned codec workers and their feeder processes
    # each open the dataset and read rows by index from the pickled HFRow references
    pq = build_dataset(tmp_path / "pq", [HFSource(str(tmp_path / "ls_tiny.parquet"))], "speech",
                       tiny_config("--data.valid_fraction=0.3", "--data.encode_chunk_seconds=0.8",
                                   "--data.codec_devices=[cpu:0, cpu:1]"), show_progress=False)
    assert sorted(pq.worker_devices.values()) == ["cpu:0", "cpu:1"]
    assert _docs(tmp_path / "pq") == ref
    assert sorted(s["record"] for s in _skipped(tmp_path / "pq")) == [
        "bad (ls_tiny:row 3)", "mute (ls_tiny:row 4)"]

    # the same command again resumes every unit; other columns are another plan
    again = build_dataset(tmp_path / "disk", [HFSource(str(tmp_path / "ls_tiny"))], "speech", cfg,
                          show_progress=False)
    assert again.units_resumed == again.units == folder.units
    with pytest.raises(BuildError, match="inputs"):
        build_dataset(tmp_path / "disk", [HFSource(str(tmp_path / "ls_tiny"), id_column="text")], "speech",
                      cfg, show_progress=False)


def test_hf_dataset_refusals_and_splits(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "build", str(out), "--hf-dataset", "openslr/librispeech_asr", "--preset", "tiny",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "openslr/librispeech_asr" in err and "never downloads" in err
    assert not out.exists()

    ds = _hf_dataset(tmp_path)
    datasets.DatasetDict({"train": ds.select(range(2)), "test": ds.select([2, 3])}).save_to_disk(
        str(tmp_path / "dd"))
    recs, bad, fp = HFSource(str(tmp_path / "dd"), split="test").plan()
    assert [r.record_id for r in recs] == ["c", "bad"] and not bad
    assert recs[0].where == "dd[test]:row 0" and fp["columns"] == {"audio": "audio", "text": "text", "id": "id"}
    assert len(pickle.dumps(recs[0])) < 1024  # what workers get: dataset path + row, not the audio
    wav, rate = recs[0].audio.read()  # the row's WAV bytes, decoded by sphn
    sec, clip_rate, freq, _ = CLIPS["c"]
    assert rate == clip_rate and np.array_equal(np.round(wav[0] * 32768).astype("<i2"), _pcm(sec, rate, freq))
    with pytest.raises(InputError, match="cannot decode audio of row 1"):
        recs[1].audio.read()
    assert [r.record_id for r in HFSource(str(tmp_path / "dd")).plan()[0]] == ["a", "b"]
    with pytest.raises(SourceError, match="splits test, train"):
        HFSource(str(tmp_path / "dd"), split="dev").plan()
    assert main(["data", "build", str(out), "--hf-dataset", str(tmp_path / "dd"), "--text-column", "sentence",
                 "--preset", "tiny", "--quiet"]) == 2
    assert "no column 'sentence' (--text-column); its columns are id, audio, text" in capsys.readouterr().err
    # without an id column, ids are <dataset>/<row>
    ds.remove_columns("id").save_to_disk(str(tmp_path / "noid"))
    assert [r.record_id for r in HFSource(str(tmp_path / "noid")).plan()[0]] == ["noid/0", "noid/1", "noid/2",
                                                                                 "noid/3"]
    # a downloaded hub snapshot (data/<split>-*.parquet) and a single .arrow file
    (tmp_path / "snap" / "data").mkdir(parents=True)
    ds.select(range(2)).to_parquet(str(tmp_path / "snap" / "data" / "train-00000-of-00001.parquet"))
    ds.select([2]).to_parquet(str(tmp_path / "snap" / "data" / "test-00000-of-00001.parquet"))
    [snap] = HFSource(str(tmp_path / "snap"), split="test").plan()[0]
    assert snap.record_id == "c" and np.array_equal(snap.audio.read()[0], recs[0].audio.read()[0])
    [arrow] = sorted((tmp_path / "noid").glob("*.arrow"))
    assert [r.where for r in HFSource(str(arrow)).plan()[0]][:1] == [f"{arrow.stem}:row 0"]


def test_missing_packages_are_named(tmp_path, monkeypatch):
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    (tmp_path / "cuts.jsonl.gz").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    monkeypatch.setitem(sys.modules, "lhotse", None)
    with pytest.raises(SourceError, match="pip install datasets"):
        HFSource(str(ds_dir)).plan()
    with pytest.raises(SourceError, match="pip install lhotse"):
        LhotseSource(cuts=str(tmp_path / "cuts.jsonl.gz")).plan()


def test_offline_and_the_files_fingerprint(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert datasets.config.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ
    small, big = tmp_path / "a.arrow", tmp_path / "b.arrow"
    small.write_bytes(b"x" * 1000)
    big.write_bytes(bytes(5 << 20))
    before = files_fingerprint(tmp_path)
    assert [(f["name"], f["size"]) for f in before] == [("a.arrow", 1000), ("b.arrow", 5 << 20)]
    with open(big, "r+b") as f:  # one byte inside the first sampled block of a large file
        f.seek(100)
        f.write(b"\x01")
    small.write_bytes(b"y" * 1000)
    after = files_fingerprint(tmp_path)
    assert [a["sha256"] != b["sha256"] for a, b in zip(after, before)] == [True, True]


# ----------------------------------------------------------------- Lhotse
def _lhotse_corpus(tmp: Path) -> tuple[Path, Path]:
    """long.wav = clip a then clip b (cut into two cuts), c.wav whole; the manifest with
    a.wav / b.wav holding exactly those samples. Returns (cuts.jsonl.gz, manifest)."""
    tmp.mkdir(parents=True, exist_ok=True)
    a, b = _pcm(*CLIPS["a"][:3]), _pcm(*CLIPS["b"][:3])
    c = _pcm(0.72, 24000, 440.0)
    (tmp / "long.wav").write_bytes(wav_bytes(np.concatenate([a, b]), 24000))
    for name, pcm in (("a", a), ("b", b), ("c", c)):
        (tmp / f"{name}.wav").write_bytes(wav_bytes(pcm, 24000))
    long_rec = lhotse.Recording.from_file(tmp / "long.wav", recording_id="long")
    c_rec = lhotse.Recording.from_file(tmp / "c.wav", recording_id="c")

    def sup(sid, rec, start, dur, text):
        return lhotse.SupervisionSegment(sid, rec, start, dur, text=text)

    cuts = lhotse.CutSet.from_cuts([
        lhotse.MonoCut("ca", 0.0, 0.8, 0, recording=long_rec, supervisions=[sup("s1", "long", 0.0, 0.8, "alpha")]),
        lhotse.MonoCut("cb", 0.8, 0.64, 0, recording=long_rec,
                       supervisions=[sup("s2", "long", 0.08, 0.24, "beta one"),
                                     sup("s3", "long", 0.4, 0.16, "beta two"),
                                     sup("s4", "long", 0.1, 0.2, None)]),  # no text: not a segment
        lhotse.MonoCut("cc", 0.0, 0.72, 0, recording=c_rec, supervisions=[sup("s5", "c", 0.0, 0.72, "gamma")]),
        lhotse.MonoCut("over", 0.8, 0.64, 0, recording=long_rec,
                       supervisions=[sup("s6", "long", 0.5, 0.4, "past the end")]),
    ])
    cuts.to_file(tmp / "cuts.jsonl.gz")
    manifest = write_manifest(tmp / "manifest.jsonl", [
        # recording_id: the cuts' recordings, which decide the split
        {"id": "ca", "audio": "a.wav", "recording_id": "long",
         "segments": [{"start": 0.0, "end": 0.8, "text": "alpha"}]},
        {"id": "cb", "audio": "b.wav", "recording_id": "long",
         "segments": [{"start": 0.08, "end": 0.32, "text": "beta one"},
                      {"start": 0.4, "end": 0.56, "text": "beta two"}]},
        {"id": "cc", "audio": "c.wav", "recording_id": "c", "segments": [{"start": 0.0, "end": 0.72, "text": "gamma"}]},
    ])
    return tmp / "cuts.jsonl.gz", manifest


def test_lhotse_cuts_build_the_manifest_documents(tmp_path):
    cuts, manifest = _lhotse_corpus(tmp_path / "in")
    cfg = _cfg()
    build_dataset(tmp_path / "ref", [manifest], "speech", cfg, show_progress=False)
    ref = _docs(tmp_path / "ref")
    assert {k[1] for k in ref} == {"ca", "cb", "cc"}
    assert main(["data", "build", str(tmp_path / "lh"), "--lhotse", str(cuts), "--preset", "tiny", "--quiet",
                 "--data.build_workers=0", "--data.valid_fraction=0.3", "--data.build_unit_recordings=2",
                 "--data.shard_size_limit=4096", "--data.encode_chunk_seconds=0.8"]) == 0
    assert _docs(tmp_path / "lh") == ref
    [over] = _skipped(tmp_path / "lh")
    assert over["record"] == "over (cuts.jsonl.gz:4)" and "runs outside the cut" in over["reason"]


def test_lhotse_plans_slices_and_recording_supervision_pairs(tmp_path):
    cuts, manifest = _lhotse_corpus(tmp_path / "in")
    recs, bad, fp = LhotseSource(cuts=str(cuts)).plan()
    assert [r.record_id for r in recs] == ["ca", "cb", "cc"] and [s.record for s in bad] == ["over (cuts.jsonl.gz:4)"]
    assert recs[1].audio == AudioSlice(str((tmp_path / "in" / "long.wav").resolve()), 0.8, 0.64)
    assert recs[2].audio == str((tmp_path / "in" / "c.wav").resolve())  # a whole recording: the file
    ref = {r.record_id: r for r in read_manifest(manifest)[0]}
    for rec in recs:  # same segments; the slices decode to the samples of the separate files
        assert rec.segments == ref[rec.record_id].segments
        assert np.array_equal(load_audio(rec.audio)[0], read_audio(ref[rec.record_id].audio)[0])
    assert fp["lhotse"][0]["flag"] == "--lhotse"

    # recordings + supervisions: one whole-recording cut each, supervision times as given
    long_rec = lhotse.Recording.from_file(tmp_path / "in" / "long.wav", recording_id="long")
    lhotse.RecordingSet.from_recordings([long_rec]).to_file(tmp_path / "recs.jsonl.gz")
    lhotse.SupervisionSet.from_segments([
        lhotse.SupervisionSegment("s1", "long", 0.0, 0.8, text="alpha"),
        lhotse.SupervisionSegment("s2", "long", 0.88, 0.24, text="beta one")]).to_file(tmp_path / "sups.jsonl.gz")
    recs, bad, _ = LhotseSource(recordings=str(tmp_path / "recs.jsonl.gz"),
                                supervisions=str(tmp_path / "sups.jsonl.gz")).plan()
    assert not bad and [r.record_id for r in recs] == ["long-0"]  # the cut ids Lhotse gives
    assert recs[0].audio == str((tmp_path / "in" / "long.wav").resolve())
    assert [(s.start, s.end, s.text) for s in recs[0].segments] == [(0.0, 0.8, "alpha"), (0.88, 1.12, "beta one")]
    with pytest.raises(SourceError, match="needs --lhotse-supervisions"):
        LhotseSource(recordings=str(tmp_path / "recs.jsonl.gz"))
    # ... and built through the command line: the documents of the equivalent manifest line
    whole = write_manifest(tmp_path / "in" / "whole.jsonl", [
        {"id": "long-0", "audio": "long.wav", "segments": [{"start": 0.0, "end": 0.8, "text": "alpha"},
                                                          {"start": 0.88, "end": 1.12, "text": "beta one"}]}])
    cfg = tiny_config("--data.valid_fraction=0")
    build_dataset(tmp_path / "ref", [whole], "speech", cfg, show_progress=False)
    args = ["--preset", "tiny", "--quiet", "--data.build_workers=0", "--data.valid_fraction=0",
            "--data.build_unit_recordings=2", "--data.shard_size_limit=4096"]
    assert main(["data", "build", str(tmp_path / "rs"), "--lhotse-recordings", str(tmp_path / "recs.jsonl.gz"),
                 "--lhotse-supervisions", str(tmp_path / "sups.jsonl.gz"), *args]) == 0
    assert _docs(tmp_path / "rs") == _docs(tmp_path / "ref")
    assert main(["data", "build", str(tmp_path / "x"), "--lhotse-supervisions", str(tmp_path / "sups.jsonl.gz"),
                 *args]) == 2
    (tmp_path / "broken.jsonl").write_text('{"id": "x", "start": 0\n')
    with pytest.raises(SourceError, match=r"broken.jsonl cannot be read \(at cut 1"):
        LhotseSource(cuts=str(tmp_path / "broken.jsonl")).plan()


def test_audio_slice_reads_whole_samples_and_checks_the_end(tmp_path):
    pcm = _pcm(1.0, 16000, 300.0)
    (tmp_path / "x.wav").write_bytes(wav_bytes(pcm, 16000))
    wav, rate = AudioSlice(str(tmp_path / "x.wav"), 0.25, 0.5).read()
    assert rate == 16000 and wav.shape == (1, 8000)
    assert np.array_equal(np.round(wav[0] * 32768).astype("<i2"), pcm[4000:12000])
    assert AudioSlice(str(tmp_path / "x.wav"), 0.5, None).read()[0].shape == (1, 8000)
    assert AudioSlice(str(tmp_path / "x.wav"), 0.5, 0.51).read()[0].shape == (1, 8000)  # within tolerance
    with pytest.raises(InputError, match="ends at 1.600 s, after the end of the audio"):
        AudioSlice(str(tmp_path / "x.wav"), 0.5, 1.1).read()
    with pytest.raises(InputError, match="starts at 1.200 s"):
        AudioSlice(str(tmp_path / "x.wav"), 1.2, 0.1).read()


def test_cuts_of_one_recording_decode_it_once(tmp_path, monkeypatch):
    """Long-form corpora cut one recording into hundreds of cuts: each decoded the whole file."""
    import soda_mega.data.write.inputs as inputs

    pcm = _pcm(2.0, 16000, 300.0)
    path = tmp_path / "long.wav"
    path.write_bytes(wav_bytes(pcm, 16000))
    decodes = []
    real = inputs.read_audio
    monkeypatch.setattr(inputs, "read_audio", lambda p, name=None: decodes.append(p) or real(p, name))
    slices = [AudioSlice(str(path), 0.25 * i, 0.25) for i in range(8)]
    for i, piece in enumerate(slices):
        wav, rate = piece.read()
        assert np.array_equal(np.round(wav[0] * 32768).astype("<i2"), pcm[4000 * i:4000 * (i + 1)])
        wav[:] = 0  # a caller's changes do not reach the next slice
    assert len(decodes) == 1
    path.write_bytes(wav_bytes(pcm[::-1].copy(), 16000))  # the file changed: decoded again
    later = path.stat().st_mtime_ns + 10**9  # (a coarse clock may not have moved)
    os.utime(path, ns=(later, later))
    wav, _ = slices[0].read()
    assert np.array_equal(np.round(wav[0] * 32768).astype("<i2"), pcm[::-1][:4000])
    assert len(decodes) == 2


def test_quiet_silences_the_datasets_progress_bars(tmp_path):
    _hf_dataset(tmp_path).to_parquet(str(tmp_path / "ls_tiny.parquet"))
    proc = subprocess.run(
        [sys.executable, "-m", "soda_mega.cli", "data", "build", str(tmp_path / "out"), "--hf-dataset",
         str(tmp_path / "ls_tiny.parquet"), "--preset", "tiny", "--quiet", "--data.build_workers=0",
         "--data.valid_fraction=0.3", "--data.encode_chunk_seconds=0.8"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "it/s]" not in proc.stderr and "examples/s]" not in proc.stderr, proc.stderr[-3000:]


def test_a_hub_name_reads_its_copy_in_the_hub_cache(tmp_path, capsys):
    """`hf download --repo-type dataset me/ls_tiny` (or a past load_dataset) left a snapshot in
    the hub cache: the name finds it there, offline; another name is still refused."""
    ds = _hf_dataset(tmp_path)
    ds.to_parquet(str(tmp_path / "ls_tiny.parquet"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub-cache" / "datasets--me--ls_tiny"
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    ds.to_parquet(str(repo / "snapshots" / commit / "data" / "train-00000-of-00001.parquet"))

    source = HFSource("me/ls_tiny")
    assert source.hub_name == "me/ls_tiny" and Path(source.path) == repo / "snapshots" / commit
    assert source.label == "ls_tiny"
    cfg = _cfg()
    build_dataset(tmp_path / "ref", [HFSource(str(tmp_path / "ls_tiny.parquet"))], "speech", cfg,
                  show_progress=False)
    build_dataset(tmp_path / "hub", [source], "speech", cfg, show_progress=False)
    assert _docs(tmp_path / "hub") == _docs(tmp_path / "ref")
    assert sorted(s["record"] for s in _skipped(tmp_path / "hub")) == [
        "bad (ls_tiny:row 3)", "mute (ls_tiny:row 4)"]

    assert main(["data", "build", str(tmp_path / "cli"), "--hf-dataset", "me/ls_tiny", "--preset", "tiny",
                 "--data.valid_fraction=0.3", "--data.encode_chunk_seconds=0.8"]) == 0
    assert f"me/ls_tiny: the local copy in the hub cache, {repo / 'snapshots' / commit}" in capsys.readouterr().err
    with pytest.raises(SourceError, match="me/other.*in the hub cache.*never downloads"):
        HFSource("me/other")
