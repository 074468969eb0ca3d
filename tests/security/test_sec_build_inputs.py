"""Hostile records given to `data build` (issue 21, items 7 and 8, build side).

Each bad record, whatever its decoder raises, is a bad record like any other: named and counted in
the dataset's ``skipped`` list while the good records are built (exit 0), or, when nothing is
left to build, exit 2 with one error line naming the record and the reason (after the one-line
"skipped" notice every bad record gets). Never a traceback, never a
Rust panic report, never silently accepted. Checked: a WAV header of 0 Hz (sphn panics), absurd
sample rates (2^31 Hz decoded to one codec frame), JSONL segments past the end of the audio (the
Lhotse path already refused them), Lhotse cuts that start before their recording.

The builds run in this process (``--data.build_workers=0``): the first one that decodes audio
makes the random-init codec (some 20 s on 2 cores), later ones reuse it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sec_build_helpers import BUILD_ARGS, corpus_with, crafted_wav, no_traceback
from soda_mega.cli import main
from soda_mega.data.write.inputs import AudioSlice, InputError, read_audio_bytes

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 384000  # what read_audio accepts


def _build(out: Path, capfd, *inputs: str) -> tuple[int, dict | None, str]:
    """``data build OUT *inputs``: exit code, the JSON result (None on failure), stderr."""
    rc = main(["data", "build", str(out), *inputs, *BUILD_ARGS])
    captured = capfd.readouterr()
    no_traceback(captured.err)
    result = json.loads(captured.out)[0] if rc == 0 else None
    return rc, result, captured.err


def _one_error_line(err: str, record: str, reason: str) -> None:
    """Exit 2's stderr: the one-line notice of each skipped record (as for every bad record),
    then one error line naming the first bad record and why."""
    lines = err.strip().splitlines()
    assert all(line.startswith("[soda-mega data] skipped ") for line in lines[:-1]), err
    assert lines[-1].startswith("soda-mega data build: the train split is empty"), err
    assert record in lines[-1] and reason in lines[-1], err


def _skipped(result: dict) -> dict[str, str]:
    return {s["record"]: s["reason"] for s in result["skipped"]}


@pytest.mark.parametrize("rate,reason", [
    (0, f"sample rate 0 Hz is below {MIN_SAMPLE_RATE} Hz"),
    (2 ** 31, f"sample rate 2147483648 Hz is above {MAX_SAMPLE_RATE} Hz"),
    (MAX_SAMPLE_RATE + 1, f"sample rate {MAX_SAMPLE_RATE + 1} Hz is above"),
    (2 ** 32 - 1, f"sample rate 4294967295 Hz is above {MAX_SAMPLE_RATE} Hz (audio is read at "
                  f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)"),
])
def test_sec_build_wav_with_an_absurd_rate_is_a_bad_record(tmp_path, capfd, rate, reason):
    src = tmp_path / "in"
    manifest = corpus_with(src, [{"id": "odd", "audio": "odd.wav", "transcript": "a header that lies"}])
    crafted_wav(src / "odd.wav", rate)
    rc, result, err = _build(tmp_path / "out", capfd, "--manifest", str(manifest))
    assert rc == 0, err
    assert result["splits"]["train"]["num_records"] == 2  # the good records are built
    skipped = _skipped(result)
    assert list(skipped) == ["odd (manifest.jsonl:3)"] and reason in skipped["odd (manifest.jsonl:3)"]


def test_sec_build_a_lone_bad_record_is_exit_2_with_one_line(tmp_path, capfd):
    src = tmp_path / "in"
    manifest = corpus_with(src, [{"id": "zero", "audio": "zero.wav", "transcript": "no rate"}], good=0)
    crafted_wav(src / "zero.wav", 0)
    rc, _, err = _build(tmp_path / "out", capfd, "--manifest", str(manifest))
    assert rc == 2
    _one_error_line(err, "zero (manifest.jsonl:1)", "sample rate 0 Hz")
    assert not (tmp_path / "out" / "train" / "index.json").exists()


def test_sec_build_hf_audio_bytes_with_0_hz_are_a_bad_record(tmp_path):
    """A Hugging Face ``Audio`` cell holding WAV bytes goes through the same reader."""
    data = crafted_wav(tmp_path / "z.wav", 0).read_bytes()
    with pytest.raises(InputError, match="audio of row 7: sample rate 0 Hz"):
        read_audio_bytes(data, "of row 7")


def test_sec_build_jsonl_segment_past_the_audio_end_is_a_bad_record(tmp_path, capfd):
    """Codes of 40 frames (3.2 s) and a 0.25 s WAV, each with a segment running seconds past
    its end: refused as the Lhotse path refuses a supervision outside its cut."""
    src = tmp_path / "in"
    bad_codes = {"id": "long-codes", "codes": "c0.npy",
                 "segments": [{"start": 0.0, "end": 1.2, "text": "fits"}, {"start": 1.6, "end": 9.0, "text": "no"}]}
    bad_wav = {"id": "long-wav", "audio": "short.wav", "segments": [{"start": 0.0, "end": 2.0, "text": "no"}]}
    manifest = corpus_with(src, [bad_codes, bad_wav])
    crafted_wav(src / "short.wav", 16000, seconds=0.25)
    rc, result, err = _build(tmp_path / "out", capfd, "--manifest", str(manifest))
    assert rc == 0, err
    skipped = _skipped(result)
    assert list(skipped) == ["long-codes (manifest.jsonl:3)", "long-wav (manifest.jsonl:4)"]
    assert "segment 1.60-9.00 s ends after the end of the audio (3.20 s)" in skipped["long-codes (manifest.jsonl:3)"]
    assert "segment 0.00-2.00 s ends after the end of the audio (0.25 s)" in skipped["long-wav (manifest.jsonl:4)"]
    assert result["splits"]["train"]["num_records"] == 2


def test_sec_build_segment_ending_within_the_last_frame_still_builds(tmp_path, capfd):
    """The check has the Lhotse path's slack: an end written a few ms past the last sample is fine."""
    src = tmp_path / "in"
    manifest = corpus_with(src, [
        {"id": "edge", "codes": "c1.npy", "segments": [{"start": 0.0, "end": 41 / 12.5 + 0.02, "text": "edge"}]}])
    rc, result, err = _build(tmp_path / "out", capfd, "--manifest", str(manifest))
    assert rc == 0, err
    assert not result["skipped"] and result["splits"]["train"]["num_records"] == 3


# ----------------------------------------------------------------------------- Lhotse
def _cuts(tmp: Path, starts: list[float]) -> Path:
    import lhotse

    tmp.mkdir(parents=True, exist_ok=True)
    crafted_wav(tmp / "a.wav", 24000, seconds=1.0, pcm_rate=24000)
    rec = lhotse.Recording.from_file(tmp / "a.wav", recording_id="a")
    cuts = [lhotse.MonoCut(f"cut{i}", start, 0.5, 0, recording=rec,
                           supervisions=[lhotse.SupervisionSegment(f"s{i}", "a", 0.0, 0.5, text="hello there")])
            for i, start in enumerate(starts)]
    lhotse.CutSet.from_cuts(cuts).to_file(tmp / "cuts.jsonl.gz")
    return tmp / "cuts.jsonl.gz"


def test_sec_build_lhotse_cut_with_a_negative_start_is_a_bad_record(tmp_path, capfd):
    pytest.importorskip("lhotse")
    cuts = _cuts(tmp_path / "in", [-0.5, 0.25])
    rc, result, err = _build(tmp_path / "out", capfd, "--lhotse", str(cuts))
    assert rc == 0, err
    skipped = _skipped(result)
    assert list(skipped) == ["cut0 (cuts.jsonl.gz:1)"]
    assert "starts at -0.500 s, before the start of recording a" in skipped["cut0 (cuts.jsonl.gz:1)"]
    assert result["splits"]["train"]["num_records"] == 1
    # alone: nothing to build, exit 2 naming the cut
    rc, _, err = _build(tmp_path / "alone", capfd, "--lhotse", str(_cuts(tmp_path / "in2", [-0.5])))
    assert rc == 2
    _one_error_line(err, "cut0 (cuts.jsonl.gz:1)", "before the start of recording a")


def test_sec_build_audio_slice_before_the_start_is_refused(tmp_path):
    path = crafted_wav(tmp_path / "x.wav", 16000, seconds=1.0)
    with pytest.raises(InputError, match="starts at -0.250 s, before the start of the audio"):
        AudioSlice(str(path), -0.25, 0.5).read()
    with pytest.raises(InputError, match="lasts -0.100 s"):
        AudioSlice(str(path), 0.25, -0.1).read()
    with pytest.raises(InputError, match="holds no whole sample"):  # an empty batch entry for the codec
        AudioSlice(str(path), 0.25, 1e-9).read()


def test_sec_build_a_nul_in_a_manifest_path_is_a_bad_record(tmp_path, capfd):
    """A path holding NUL made os.path raise ValueError while planning: a traceback for the whole
    build, in the JSONL and the Lhotse path alike."""
    src = tmp_path / "in"
    manifest = corpus_with(src, [{"id": "nul", "codes": "c0\u0000.npy", "transcript": "x"}])
    rc, result, err = _build(tmp_path / "out", capfd, "--manifest", str(manifest))
    assert rc == 0, err
    assert _skipped(result) == {"manifest.jsonl:3":
                                "path 'c0\\x00.npy' holds a NUL character"}


def test_sec_build_a_nul_in_a_lhotse_source_is_a_bad_record(tmp_path, capfd):
    pytest.importorskip("lhotse")
    cuts = _cuts(tmp_path / "in", [0.0, 0.25])
    import gzip

    lines = gzip.decompress(cuts.read_bytes()).decode().splitlines()
    lines[0] = lines[0].replace('a.wav"', 'a.wav\\u0000"')
    cuts.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    rc, result, err = _build(tmp_path / "out", capfd, "--lhotse", str(cuts))
    assert rc == 0, err
    skipped = _skipped(result)
    assert list(skipped) == ["cut0 (cuts.jsonl.gz:1)"] and "is not a file path" in skipped["cut0 (cuts.jsonl.gz:1)"]
