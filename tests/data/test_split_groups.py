"""Issue 33.1: the train/valid split goes by recording (or speaker), never by segment id.

Segments of one recording (manifest lines sharing an audio file or a ``recording_id``, Lhotse cuts
of ``trim_to_supervisions()``, Hugging Face rows sharing a recording column) must all land in one
split; with ``data.split_by=speaker`` speakers too. The JSONL case is built for real (pre-encoded
codes, no codec); Lhotse and Hugging Face inputs are checked on the build's plan, with the split
function the build workers use.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import datasets
import lhotse
import numpy as np
import pytest

from build_helpers import random_codes, read_split, tiny_config, wav_bytes, write_manifest
from soda_mega.data.schema import SPLITS
from soda_mega.data.write.builder import build_dataset, make_plan
from soda_mega.data.write.hf_input import HFSource
from soda_mega.data.write.inputs import InputError, read_manifest
from soda_mega.data.write.lhotse_input import LhotseSource
from soda_mega.data.write.splits import assign_groups, record_split
from soda_mega.tokens.layout import VocabLayout

FRACTION = "--data.valid_fraction=0.5"


def _splits_of(groups: dict[str, set[str]]) -> dict[str, set[str]]:
    return {g: s for g, s in groups.items() if len(s) > 1}


def _segment_manifest(tmp: Path) -> Path:
    """Four recordings (.npy codes) cut into five segment lines each, each line its own id."""
    tmp.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in range(4):
        np.save(tmp / f"rec{r}.npy", random_codes(r, 80))
        lines += [{"id": f"rec{r}-seg{s}", "codes": f"rec{r}.npy",
                   "segments": [{"start": 1.0 * s, "end": 1.0 * s + 0.8, "text": f"part {s} of {r}"}]}
                  for s in range(5)]
    return write_manifest(tmp / "segments.jsonl", lines)


def test_segment_lines_of_one_recording_land_in_one_split(tmp_path):
    manifest = _segment_manifest(tmp_path / "in")
    build_dataset(tmp_path / "out", [manifest], "speech", tiny_config(FRACTION), show_progress=False)
    where: dict[str, set[str]] = defaultdict(set)
    for split in SPLITS:
        for sample in read_split(tmp_path / "out" / split):
            where[sample["record_id"].split("-")[0]].add(split)
    assert set(where) == {"rec0", "rec1", "rec2", "rec3"}
    assert not _splits_of(where), f"recordings in both splits: {_splits_of(where)}"
    assert {s for v in where.values() for s in v} == {"train", "valid"}  # both splits are used


def test_manifest_recording_id_and_speaker_keys(tmp_path):
    np.save(tmp_path / "x.npy", random_codes(0, 20))
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"id": f"u{i}", "codes": "x.npy", "recording_id": f"talk{i // 3}", "speaker": f"spk{i // 6}",
         "transcript": "hi"} for i in range(12)] + [
        {"id": "bad", "codes": "x.npy", "recording_id": ["not", "a", "key"], "transcript": "hi"}])
    recs, bad = read_manifest(manifest)
    assert [r.recording for r in recs[:4]] == ["talk0", "talk0", "talk0", "talk1"]
    assert recs[0].speakers == ("spk0",)
    assert [s.record for s in bad] == ["m.jsonl:13"] and "'recording_id'" in bad[0].reason
    by_rec = assign_groups(recs, "recording")
    assert {r.group for r in by_rec} == {f"talk{i}" for i in range(4)}
    by_spk = assign_groups(recs, "speaker")
    assert {r.group for r in by_spk} == {"speaker:spk0", "speaker:spk1"}
    # without recording_id, the audio path as written is the recording
    (tmp_path / "a").mkdir()
    plain = write_manifest(tmp_path / "p.jsonl", [{"id": "a", "codes": "a/../x.npy", "transcript": "hi"},
                                                  {"id": "b", "codes": "x.npy", "transcript": "hi"}])
    assert [r.recording for r in read_manifest(plain)[0]] == ["x.npy", "x.npy"]
    with pytest.raises(ValueError, match="split_by"):
        assign_groups(recs, "record")


def _lhotse_cuts(tmp: Path) -> Path:
    """Three recordings lh0..lh2 with six supervisions each, trimmed to their supervisions (the
    usual pattern: several cuts per recording). lh0 and lh1 are one speaker's; lh2 is a
    conversation of spk1 and spk2."""
    tmp.mkdir(parents=True, exist_ok=True)
    recordings, sups = [], []
    speakers = {"lh0": ["spk0"], "lh1": ["spk0"], "lh2": ["spk1", "spk2"]}
    for name, who in speakers.items():
        pcm = (np.sin(np.arange(16000 * 3) / 7.0) * 8000).astype("<i2")
        (tmp / f"{name}.wav").write_bytes(wav_bytes(pcm, 16000))
        recordings.append(lhotse.Recording.from_file(tmp / f"{name}.wav", recording_id=name))
        sups += [lhotse.SupervisionSegment(f"{name}-s{i}", name, 0.5 * i, 0.4, text=f"words {i}",
                                           speaker=who[i % len(who)]) for i in range(6)]
    cuts = lhotse.CutSet.from_manifests(recordings=lhotse.RecordingSet.from_recordings(recordings),
                                        supervisions=lhotse.SupervisionSet.from_segments(sups))
    cuts = cuts.trim_to_supervisions()
    cuts.to_file(tmp / "cuts.jsonl.gz")
    return tmp / "cuts.jsonl.gz"


def _planned_splits(inputs, *overrides: str) -> dict[str, set[str]]:
    """Recording -> splits its records go to, from the build's plan and the workers' split rule."""
    cfg = tiny_config(FRACTION, *overrides)
    plan = make_plan("speech", inputs, cfg, VocabLayout.from_config(cfg.vocab), {}, lambda has_audio: None)
    where: dict[str, set[str]] = defaultdict(set)
    for _, records in plan.units:
        for rec in records:
            where[rec.recording].add(record_split(rec, cfg.data.valid_fraction))
    return where


def test_lhotse_cuts_of_one_recording_land_in_one_split(tmp_path):
    cuts = _lhotse_cuts(tmp_path)
    assert len(list(lhotse.CutSet.from_file(cuts))) == 18
    where = _planned_splits([LhotseSource(cuts=str(cuts))])
    assert set(where) == {"lh0", "lh1", "lh2"}
    assert not _splits_of(where), f"recordings in both splits: {_splits_of(where)}"
    recs = LhotseSource(cuts=str(cuts)).plan()[0]
    assert {r.speakers for r in recs if r.recording == "lh2"} == {("spk1",), ("spk2",)}

    # by speaker: lh0 and lh1 (one speaker) go together, and lh2 stays whole with both its speakers
    plan_recs = assign_groups(recs, "speaker")
    groups = {r.recording: r.group for r in plan_recs}
    assert groups["lh0"] == groups["lh1"] == "speaker:spk0" and groups["lh2"] == "speaker:spk1"
    where = _planned_splits([LhotseSource(cuts=str(cuts))], "--data.split_by=speaker")
    assert not _splits_of(where) and where["lh0"] == where["lh1"]


def test_hf_rows_split_by_their_recording_column(tmp_path):
    rows = 12
    ds = datasets.Dataset.from_dict({
        "id": [f"row{i}" for i in range(rows)], "text": ["hello"] * rows,
        "audio": [""] * rows, "source": [f"long{i % 3}" for i in range(rows)],
        "spk": [f"s{i % 2}" for i in range(rows)]})
    ds.save_to_disk(str(tmp_path / "ds"))
    src = HFSource(str(tmp_path / "ds"), recording_column="source", speaker_column="spk")
    recs, bad, fp = src.plan()
    assert not bad and [r.recording for r in recs[:4]] == ["long0", "long1", "long2", "long0"]
    assert recs[1].speakers == ("s1",) and fp["columns"]["recording"] == "source"
    where = _planned_splits([src])
    assert set(where) == {"long0", "long1", "long2"} and not _splits_of(where)
    # by speaker: every recording holds both speakers, so everything is one group
    assert {r.group for r in assign_groups(recs, "speaker")} == {"speaker:s0"}
    with pytest.raises(Exception, match="no column 'nope' \\(--recording-column\\)"):
        HFSource(str(tmp_path / "ds"), recording_column="nope").plan()


def test_a_bad_speaker_is_a_bad_line_not_a_crash(tmp_path):
    np.save(tmp_path / "x.npy", random_codes(0, 20))
    manifest = write_manifest(tmp_path / "m.jsonl", [{"codes": "x.npy", "speaker": True, "transcript": "a"}])
    recs, bad = read_manifest(manifest)
    assert not recs and "'speaker' must be a non-empty string" in bad[0].reason
    assert issubclass(InputError, ValueError)


def test_eval_tasks_hold_out_the_recordings_the_build_holds_out(tmp_path):
    """`eval make-tasks --split valid` must pick the build's valid recordings, not segments of
    training recordings."""
    from soda_mega.eval.task_builder import build_tasks

    lines = []
    for r in range(4):
        pcm = (np.sin(np.arange(24000 * 3) / (5.0 + r)) * 8000).astype("<i2")
        (tmp_path / f"rec{r}.wav").write_bytes(wav_bytes(pcm, 24000))
        lines += [{"id": f"rec{r}-seg{s}", "audio": f"rec{r}.wav",
                   "segments": [{"start": 0.9 * s, "end": 0.9 * s + 0.6, "text": f"part {s}"}]} for s in range(3)]
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    picked = {}
    for split in ("train", "valid"):
        built = build_tasks(manifest, tmp_path / split, split=split, valid_fraction=0.5, pair_seconds=None,
                            min_seconds=0.5)
        picked[split] = {json.loads(line)["id"].split("-")[0] for line in built.utterances.read_text().splitlines()}
    assert picked["train"] and picked["valid"] and not picked["train"] & picked["valid"], picked


def test_split_by_speaker_from_the_command_line(tmp_path):
    """`data build --split-by speaker`: no speaker in both splits (several recordings each)."""
    from soda_mega.cli import main

    lines = []
    for r in range(8):
        np.save(tmp_path / f"r{r}.npy", random_codes(r, 30))
        lines.append({"id": f"u{r}", "codes": f"r{r}.npy", "speaker": f"spk{r % 4}", "transcript": f"text {r}"})
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    out = tmp_path / "out"
    assert main(["data", "build", str(out), "--manifest", str(manifest), "--preset", "tiny", "--quiet",
                 "--split-by", "speaker", "--data.build_workers=0", FRACTION]) == 0
    speaker = {line["id"]: line["speaker"] for line in lines}
    where: dict[str, set[str]] = defaultdict(set)
    for split in SPLITS:
        for sample in read_split(out / split):
            where[speaker[sample["record_id"]]].add(split)
    assert len(where) == 4 and not _splits_of(where), where
    assert {s for v in where.values() for s in v} == {"train", "valid"}
    meta = json.loads((out / "train" / "soda_meta.json").read_text())
    assert meta["build"]["split_by"] == "speaker"
