"""``soda-mega data inspect`` on a small built dataset: counts, one readable document, WAV."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from soda_mega.cli import main
from soda_mega.config import load_config
from soda_mega.data.read.inspect import first_audio_codes, render_document, spans
from soda_mega.data.tokenizer import ByteTokenizer
from soda_mega.data.write.synthetic import write_split
from soda_mega.tokens import VocabLayout


@pytest.fixture(scope="module")
def layout():
    return VocabLayout.from_config(load_config(preset="tiny").vocab)


def _doc(layout, frames=5):
    codes = np.arange(frames * layout.num_codebooks).reshape(layout.num_codebooks, frames) % 7
    import torch

    audio = layout.codes_to_ids(torch.from_numpy(codes)).numpy()
    text = list(b"hi there")
    return np.array([layout.bos_id, layout.text_start, *text, layout.text_end, layout.audio_start,
                     *audio, layout.audio_end, layout.eos_id], dtype=np.int32), codes


def test_render_shows_text_specials_and_audio_frames(layout):
    doc, _ = _doc(layout)
    out = render_document(doc, layout, ByteTokenizer())
    assert out.startswith("<BOS> <|text_start|> 'hi there' <|text_end|> <|audio_start|> "
                          "[audio 5 frames x codebooks 0..7] <|audio_end|> <EOS>")
    assert "ids: 256 258 104 105" in out
    assert [k for k, _ in spans(doc, layout)] == ["text", "special", "text", "special", "special",
                                                 "audio", "special", "text"]


def test_render_keeps_bos_and_eos_in_place_in_a_text_only_document(layout):
    """Issue 33.12: BOS text EOS is one text span; EOS was shown before the text."""
    doc = np.array([layout.bos_id, *b"plain words", layout.eos_id], dtype=np.int32)
    out = render_document(doc, layout, ByteTokenizer())
    assert out.startswith("<BOS> 'plain words' <EOS>\n")
    no_tokenizer = render_document(doc, layout)
    assert no_tokenizer.startswith("<BOS> 'ids [112, 108, 97") and no_tokenizer.split("\n")[0].endswith(" <EOS>")


def test_first_audio_span_round_trips_to_codes(layout):
    doc, codes = _doc(layout, frames=6)
    np.testing.assert_array_equal(first_audio_codes(doc, layout).numpy(), codes)


def test_inspect_command_reports_and_writes_wav(tmp_path, layout, capsys):
    doc, _ = _doc(layout, frames=25)
    root = tmp_path / "ds"
    write_split(root / "train", layout, [doc, doc], "speech")
    write_split(root / "valid", layout, [doc], "speech", split="valid")
    wav_path = tmp_path / "first.wav"
    assert main(["data", "inspect", str(root), "--sample", "1", "--wav", str(wav_path)]) == 0
    out = capsys.readouterr().out
    assert "train: 2 documents" in out and "valid: 1 documents" in out
    assert "document 1 of train" in out and "[audio 25 frames x codebooks 0..7]" in out
    with wave.open(str(wav_path)) as f:
        assert f.getframerate() == 24000
        assert f.getnframes() == pytest.approx(25 / 12.5 * 24000, rel=0.01)
    assert main(["data", "inspect", str(root), "--sample", "9"]) == 2
    assert "outside the train split" in capsys.readouterr().err
