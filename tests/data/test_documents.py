"""SODA document layouts, token by token (SODA_SPEC section 1), on a hand-made recording."""

from __future__ import annotations

import numpy as np
import pytest

from build_helpers import read_split, tiny_config, write_manifest
from soda_mega.data.documents import (
    interleaved,
    recording_documents,
    segment_frames,
    semantic_only,
    speech_only,
    text_only,
)
from soda_mega.data.write.builder import build_dataset
from soda_mega.tokens.layout import VocabLayout

# text 0..9 (BOS 8, EOS 9); <|text_start|> 10, <|text_end|> 11, <|audio_start|> 12,
# <|audio_end|> 13; codebook 0: 14..17, codebook 1: 18..21.
SMALL = VocabLayout(text_vocab_size=10, num_codebooks=2, codebook_size=4, bos_id=8, eos_id=9)
CODES = np.array([[0, 1, 2, 3, 1],
                  [3, 2, 1, 0, 2]])
# frame-major ids per frame: (14, 21) (15, 20) (16, 19) (17, 18) (15, 20)
SEGMENTS = [(0, 2, [1, 2]), (3, 5, [5])]


def test_special_ids_of_the_small_layout():
    assert (SMALL.text_start, SMALL.text_end, SMALL.audio_start, SMALL.audio_end) == (10, 11, 12, 13)
    assert SMALL.codebook_range(0) == (14, 18) and SMALL.codebook_range(1) == (18, 22)


def test_audio_first():
    docs = recording_documents(SMALL, "r", CODES, SEGMENTS, ["audio_first"])
    assert docs[0].tokens.tolist() == [8, 12, 14, 21, 15, 20, 13, 10, 1, 2, 11,
                                       12, 17, 18, 15, 20, 13, 10, 5, 11, 9]


def test_text_first():
    docs = recording_documents(SMALL, "r", CODES, SEGMENTS, ["text_first"])
    assert docs[0].tokens.tolist() == [8, 10, 1, 2, 11, 12, 14, 21, 15, 20, 13,
                                       10, 5, 11, 12, 17, 18, 15, 20, 13, 9]


def test_speech_only_and_semantic_only_cover_the_whole_recording():
    speech, semantic = recording_documents(SMALL, "r", CODES, SEGMENTS, ["speech_only", "semantic_only"])
    assert speech.tokens.tolist() == [8, 12, 14, 21, 15, 20, 16, 19, 17, 18, 15, 20, 13, 9]
    assert semantic.tokens.tolist() == [8, 12, 14, 15, 16, 17, 15, 13, 9]
    assert speech.doc_type == "speech_only" and semantic.doc_type == "semantic_only"


def test_text_only():
    assert text_only(SMALL, [1, 2, 3]).tolist() == [8, 1, 2, 3, 9]
    assert text_only(SMALL, []).tolist() == [8, 9]


def test_masks_are_ones_and_dtypes_fixed():
    for doc in recording_documents(SMALL, "r", CODES, SEGMENTS,
                                   ["audio_first", "text_first", "speech_only", "semantic_only"]):
        assert doc.tokens.dtype == np.int32 and doc.loss_mask.dtype == np.uint8
        assert doc.loss_mask.tolist() == [1] * len(doc.tokens) and doc.record_id == "r"


def test_untranscribed_recording_builds_only_audio_types():
    docs = recording_documents(SMALL, "r", CODES, None, ["audio_first", "text_first", "speech_only"])
    assert [d.doc_type for d in docs] == ["speech_only"]


def test_building_blocks_agree_with_recording_documents():
    codes = [CODES[:, 0:2], CODES[:, 3:5]]
    assert interleaved(SMALL, codes, [[1, 2], [5]], audio_first=True).tolist() == \
        recording_documents(SMALL, "r", CODES, SEGMENTS, ["audio_first"])[0].tokens.tolist()
    assert speech_only(SMALL, CODES).tolist()[2:4] == [14, 21]
    assert semantic_only(SMALL, CODES).tolist()[2:4] == [14, 15]
    with pytest.raises(ValueError):
        interleaved(SMALL, codes, [[1]], audio_first=True)


@pytest.mark.parametrize("start,end,expected", [
    (0.0, 0.16, (0, 2)),      # exactly two 80 ms frames
    (0.08, 0.24, (1, 3)),     # boundaries on frame edges stay put despite float rounding
    (0.1, 0.17, (1, 3)),      # partial frames at both ends are included
    (0.3, None, (3, 10)),     # None runs to the end
    (0.5, 99.0, (6, 10)),     # clipped to the recording
])
def test_segment_frames(start, end, expected):
    assert segment_frames(start, end, 12.5, 10) == expected


def test_two_segment_recording_through_the_whole_build(tmp_path):
    """Manifest + .npy codes -> MDS -> read back: exact ids with the tiny layout and byte tokenizer."""
    cfg = tiny_config("--data.valid_fraction=0",
                      "--data.doc_types=[audio_first, text_first, speech_only, semantic_only]")
    layout = VocabLayout.from_config(cfg.vocab)
    codes = np.array([[5, 6, 7, 8]] + [[k, k, k, k] for k in range(1, 8)], dtype=np.int64)
    np.save(tmp_path / "c.npy", codes)
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"id": "hand", "codes": "c.npy",
         "segments": [{"start": 0.0, "end": 0.16, "text": "Hi"}, {"start": 0.24, "end": 0.32, "text": "é"}]}])
    build_dataset(tmp_path / "out", [manifest], "speech", cfg, show_progress=False)

    def frame(t):  # tiny layout: audio base 262, codebook k starts at 262 + 2048 k
        return [262 + 2048 * k + int(codes[k, t]) for k in range(8)]

    bos, eos, ts, te, a0, a1 = 256, 257, 258, 259, 260, 261
    hi, e_acute = [72, 105], [0xC3, 0xA9]
    expected = {
        "audio_first": [bos, a0, *frame(0), *frame(1), a1, ts, *hi, te, a0, *frame(3), a1, ts, *e_acute, te, eos],
        "text_first": [bos, ts, *hi, te, a0, *frame(0), *frame(1), a1, ts, *e_acute, te, a0, *frame(3), a1, eos],
        "speech_only": [bos, a0, *frame(0), *frame(1), *frame(2), *frame(3), a1, eos],
        "semantic_only": [bos, a0, 267, 268, 269, 270, a1, eos],
    }
    assert (layout.audio_base, layout.text_start, layout.audio_end) == (262, ts, a1)
    samples = read_split(tmp_path / "out" / "train")
    assert [s["doc_type"] for s in samples] == list(expected)
    for s in samples:
        assert s["tokens"].tolist() == expected[s["doc_type"]], s["doc_type"]
        assert s["record_id"] == "hand" and s["loss_mask"].tolist() == [1] * len(s["tokens"])
