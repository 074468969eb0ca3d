"""``soda-mega translate``: span order forced, target audio decoded from whole frames."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import torch

from checkpoint_helpers import make_tiny_checkpoint
from soda_mega.cli import main as cli
from soda_mega.inference.spans import split_spans
from soda_mega.tokens.layout import VocabLayout

FALLBACK = Path(__file__).resolve().parents[2] / "soda_mega" / "data" / "write" / "demo_assets" / "fallback"


def test_split_spans_inverts_the_document_layout():
    lay = VocabLayout.soda_default()
    a = [lay.audio_base + 3] * 8
    stream = [lay.text_start, 5, 6, lay.text_end, lay.audio_start, *a, lay.audio_end, lay.eos_id]
    assert split_spans(lay, stream) == [("text", [5, 6]), ("audio", a)]
    assert split_spans(lay, [lay.audio_start, *a[:3]]) == [("audio", a[:3])]  # cut mid-span


def test_translate_writes_texts_and_decodable_audio(tmp_path):
    from soda_mega.data.read.inspect import write_wav
    from soda_mega.data.write.inputs import read_audio

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", 4)
    wav, rate = read_audio(FALLBACK / "fallback_0.wav")
    src = tmp_path / "source.wav"
    write_wav(src, torch.from_numpy(wav[0, rate // 2: rate * 3 // 2]), rate)  # 1 s of speech
    out = tmp_path / "out"
    assert cli(["translate", str(ckpt), str(src), "--out", str(out), "--max-new-tokens", "400",
                "--temperature", "1.0", "--top-p", "1.0"]) == 0
    rows = [json.loads(line) for line in (out / "translations.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and set(rows[0]) >= {"source_text", "target_text", "target_wav", "complete"}
    with wave.open(rows[0]["target_wav"]) as f:
        assert f.getframerate() == 24000 and f.getnframes() % 1920 == 0
        assert f.getnframes() / 24000 == rows[0]["target_seconds"]
