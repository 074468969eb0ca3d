"""Input readers: manifests, audio, pre-encoded codes, text corpora, and every bad-input case."""

from __future__ import annotations

import json

import numpy as np
import pytest

from build_helpers import tone, wav_bytes, write_manifest
from soda_mega.data.write.inputs import (
    InputError,
    Segment,
    Skipped,
    TextDoc,
    load_codes,
    plan_text,
    read_audio,
    read_manifest,
    read_text_range,
    text_format,
)


def test_manifest_good_records(tmp_path):
    path = write_manifest(tmp_path / "train.jsonl", [
        {"id": "a", "audio": "wavs/a.wav", "transcript": "  Hello there. "},
        {"audio": "b.flac", "segments": [{"start": 2.0, "end": 3.5, "text": "second"},
                                         {"start": 0, "end": 1.5, "text": "first"}]},
        {"id": 7, "codes": "c.npy"},
        "",
    ])
    recs, skipped = read_manifest(path)
    assert skipped == []
    a, b, c = recs
    assert a.record_id == "a" and a.audio == str(tmp_path / "wavs" / "a.wav") and a.codes is None
    assert a.segments == (Segment(0.0, None, "Hello there."),)
    assert b.record_id == "train/b.flac" and b.where == "train.jsonl:2"
    assert [s.text for s in b.segments] == ["first", "second"]  # sorted by start
    assert c.record_id == "7" and c.codes == str(tmp_path / "c.npy") and c.segments is None


BAD_LINES = [
    ("not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"transcript": "x"}, "exactly one of 'audio'"),
    ({"audio": "a.wav", "codes": "a.npy"}, "exactly one of 'audio'"),
    ({"audio": 3}, "must be a path string"),
    ({"audio": "a.wav", "transcript": "x", "segments": []}, "not both"),
    ({"audio": "a.wav", "transcript": "   "}, "non-empty string"),
    ({"audio": "a.wav", "segments": []}, "non-empty list"),
    ({"audio": "a.wav", "segments": [{"start": 0, "text": "x"}]}, "start, end and text"),
    ({"audio": "a.wav", "segments": [{"start": 2, "end": 1, "text": "x"}]}, "start < end"),
    ({"audio": "a.wav", "segments": [{"start": "0", "end": 1, "text": "x"}]}, "finite number"),
    ({"audio": "a.wav", "segments": [{"start": 0, "end": float("nan"), "text": "x"}]}, "finite number"),
    ({"audio": "a.wav", "transcript": "\ud800"}, "not valid Unicode"),
    ({"audio": "a.wav", "id": ""}, "'id' must be"),
]


def test_manifest_bad_lines_are_named_and_counted(tmp_path):
    lines = [json.dumps({"id": "ok", "audio": "ok.wav"})]
    lines += [b if isinstance(b, str) else json.dumps(b) for b, _ in BAD_LINES]
    lines += [json.dumps({"id": "ok", "audio": "dup.wav"})]
    path = tmp_path / "m.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"audio": "\xff.wav"}\n')
    recs, skipped = read_manifest(path)
    assert [r.record_id for r in recs] == ["ok"]
    assert len(skipped) == len(BAD_LINES) + 2
    for i, (_, reason) in enumerate(BAD_LINES):
        assert skipped[i].record == f"m.jsonl:{i + 2}"
        assert reason in skipped[i].reason, (skipped[i], reason)
    assert "duplicate record id" in skipped[-2].reason and "m.jsonl:1" in skipped[-2].reason
    assert skipped[-1].record == f"m.jsonl:{len(BAD_LINES) + 3}" and "UTF-8" in skipped[-1].reason


def test_read_audio_formats(tmp_path):
    mono = tone(0.5, 16000)
    (tmp_path / "i16.wav").write_bytes(wav_bytes((mono * 32767).astype("<i2"), 16000))
    (tmp_path / "f32.wav").write_bytes(wav_bytes(mono, 16000, fmt_code=3, bits=32))
    (tmp_path / "st.wav").write_bytes(wav_bytes(np.stack([mono, -mono]).astype(np.float32), 22050,
                                                fmt_code=3, bits=32))
    wav, rate = read_audio(tmp_path / "i16.wav")
    assert wav.shape == (1, 8000) and rate == 16000 and wav.dtype == np.float32
    np.testing.assert_allclose(wav[0], mono, atol=1e-4)
    wav, _ = read_audio(tmp_path / "f32.wav")
    np.testing.assert_allclose(wav[0], mono, atol=1e-6)
    wav, rate = read_audio(tmp_path / "st.wav")
    assert wav.shape == (2, 8000) and rate == 22050


@pytest.mark.parametrize("name,content,reason", [
    ("missing.wav", None, "not found"),
    ("junk.wav", b"this is not audio at all", "cannot decode"),
    ("trunc.wav", wav_bytes(np.zeros(1000, "<i2"), 16000)[:30], "cannot decode"),
    ("empty.wav", wav_bytes(np.zeros(0, "<i2"), 16000), "empty"),
    ("bits12.wav", wav_bytes(np.zeros(100, "<i2"), 16000, bits=12), "cannot decode"),  # wrong sample format
    ("ulaw.wav", wav_bytes(np.zeros(100, "u1"), 8000, fmt_code=7, bits=8), "cannot decode"),
    ("nan.wav", wav_bytes(np.array([0.1, np.nan] * 50, np.float32), 16000, fmt_code=3, bits=32), "NaN"),
    ("slow.wav", wav_bytes(np.zeros(100, "<i2"), 4000), "below 8000 Hz"),
])
def test_read_audio_bad_inputs(tmp_path, name, content, reason):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=reason):
        read_audio(tmp_path / name)


def test_load_codes(tmp_path):
    codes = np.random.default_rng(0).integers(0, 2048, (10, 30))
    np.save(tmp_path / "c.npy", codes.astype(np.uint16))
    out = load_codes(tmp_path / "c.npy", 8, 2048)
    assert out.shape == (8, 30) and out.dtype == np.int64
    np.testing.assert_array_equal(out, codes[:8])  # extra residual codebooks are cut


@pytest.mark.parametrize("array,reason", [
    (None, "not found"),
    (b"not a npy file", "cannot read codes"),
    (np.zeros(10, np.int64), r"must be \[num_codebooks, frames\]"),
    (np.zeros((8, 5), np.float32), "must be integers"),
    (np.zeros((4, 5), np.int64), "have 4 codebooks; the layout needs 8"),
    (np.zeros((8, 0), np.int64), "empty"),
    (np.full((8, 5), 2048, np.int64), r"outside \[0, 2048\)"),
    (np.full((8, 5), -1, np.int64), r"outside \[0, 2048\)"),
])
def test_load_codes_bad_inputs(tmp_path, array, reason):
    path = tmp_path / "c.npy"
    if isinstance(array, bytes):
        path.write_bytes(array)
    elif array is not None:
        np.save(path, array)
    with pytest.raises(InputError, match=reason):
        load_codes(path, 8, 2048)


def _read_all(path, fmt, per_unit):
    ranges = plan_text(path, fmt, per_unit)
    return ranges, [item for r in ranges for item in read_text_range(r)]


PLAIN = b"First para\nline two.\n\n\n  Second para.  \n\nThird \xff bad.\n\nFourth.\nend\n"


def test_plain_text_paragraphs_in_any_unit_size(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(PLAIN)
    assert text_format(path, "paragraph") == "paragraph"
    for per_unit in (1, 2, 3, 10):
        ranges, items = _read_all(path, "paragraph", per_unit)
        assert sum(r.num_docs for r in ranges) == 4
        assert items[0] == TextDoc("corpus.txt:1", "First para\nline two.")
        assert items[1] == TextDoc("corpus.txt:5", "Second para.")
        assert isinstance(items[2], Skipped) and items[2].record == "corpus.txt:7"
        assert "UTF-8" in items[2].reason
        assert items[3] == TextDoc("corpus.txt:9", "Fourth.\nend")


def test_plain_text_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(PLAIN)
    _, items = _read_all(path, "line", 2)
    texts = [i.text if isinstance(i, TextDoc) else None for i in items]
    assert texts == ["First para", "line two.", "Second para.", None, "Fourth.", "end"]
    assert [i.record_id for i in items if isinstance(i, TextDoc)][-1] == "c.txt:10"


def test_jsonl_corpus(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "one", "id": "x1"}\n{"text": ""}\nnope\n[1]\n{"text": "two"}\n'
                     b'{"text": "\xe9t\xe9"}\n')
    assert text_format(path, "paragraph") == "jsonl"
    _, items = _read_all(path, "jsonl", 4)
    assert items[0] == TextDoc("x1", "one")
    assert [type(i).__name__ for i in items] == ["TextDoc", "Skipped", "Skipped", "Skipped", "TextDoc", "Skipped"]
    assert "non-empty string" in items[1].reason and "not valid JSON" in items[2].reason
    assert "JSON object" in items[3].reason
    assert items[4] == TextDoc("c.jsonl:5", "two")
    assert items[5].record == "c.jsonl:6" and "UTF-8" in items[5].reason
