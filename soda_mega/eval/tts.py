"""Zero-shot voice-prompted TTS (SODA_SPEC section 5): synthesis, decoding to WAV, WER.

Prompt: ``<|text_start|> prompt text <|text_end|> <|audio_start|> prompt audio <|audio_end|>
<|text_start|> target text <|text_end|> <|audio_start|>``; sampled with temperature 0.9 and
top-p 0.8 (SODA's settings, overridable) for up to 1500 tokens, until ``<|audio_end|>``.
Structure-aware decoding keeps every generated id in its codebook slot, so the output is
whole Mimi frames and always decodes.

The voice prompt of an item is its own ``prompt_audio`` / ``prompt_text`` when the manifest
gives them, else another utterance of the manifest (the next one with a different text).
Scoring transcribes the decoded WAVs with a pluggable :class:`~soda_mega.eval.asr.Transcriber`
and reports WER against the target text. Speaker similarity needs a speaker-embedding model,
which soda-mega does not ship; it is not computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from soda_mega.data.read.inspect import write_wav
from soda_mega.eval.asr import ContextWarning, Utterance
from soda_mega.eval.prompts import tts_prompt
from soda_mega.eval.speech_io import SpeechIO
from soda_mega.eval.wer import normalize
from soda_mega.inference.decoder import SodaDecoder
from soda_mega.inference.generate import generate
from soda_mega.inference.sampling import Sampling

SODA_TTS_SAMPLING = Sampling(temperature=0.9, top_p=0.8)
SODA_TTS_MAX_TOKENS = 1500


@dataclass
class TTSItem:
    id: str
    target_text: str
    prompt_text: str
    prompt_audio: list[int]


@dataclass
class TTSResult:
    id: str
    target_text: str
    wav: Path
    seconds: float
    stop_reason: str
    frames: int


def voice_prompts(utterances: Sequence[Utterance], speech: SpeechIO) -> list[TTSItem]:
    """One TTS item per utterance, with its voice prompt (see the module docstring)."""
    items = []
    n = len(utterances)
    for i, u in enumerate(utterances):
        if u.fields.get("prompt_audio") and u.fields.get("prompt_text"):
            items.append(TTSItem(u.id, u.text, str(u.fields["prompt_text"]),
                                 speech.audio_ids(u.fields["prompt_audio"])))
            continue
        others = [utterances[(i + j) % n] for j in range(1, n)]
        other = next((o for o in others if normalize(o.text) != normalize(u.text)), None)
        if other is None:
            raise ValueError(f"{u.id}: no other utterance with a different text to use as the voice "
                             "prompt; add prompt_audio and prompt_text to the manifest")
        items.append(TTSItem(u.id, u.text, other.text, other.audio))
    return items


def synthesize(decoder: SodaDecoder, speech: SpeechIO, items: Sequence[TTSItem], out_dir: Path,
               sampling: Sampling = SODA_TTS_SAMPLING, max_new_tokens: int = SODA_TTS_MAX_TOKENS,
               seed: int = 0, batch_size: int = 8) -> list[TTSResult]:
    """Generate, decode and write ``out_dir/<id>.wav`` for every item."""
    layout = decoder.layout
    prompts = [tts_prompt(layout, speech.text_ids(it.prompt_text), it.prompt_audio,
                          speech.text_ids(it.target_text)) for it in items]
    warn = ContextWarning(decoder.cfg.model.seq_length)
    for p in prompts:
        warn.check(len(p) + max_new_tokens, "TTS prompts plus up to max_new_tokens")
    gens = generate(decoder, prompts, max_new_tokens, sampling, stop_ids=[layout.audio_end],
                    seed=seed, batch_size=batch_size)
    results = []
    for it, gen in zip(items, gens):
        wav = speech.waveform(gen.tokens)
        path = Path(out_dir) / f"{it.id.replace('/', '_')}.wav"
        write_wav(path, wav, speech.sample_rate)
        frames = speech.codes(gen.tokens).shape[-1]
        results.append(TTSResult(it.id, it.target_text, path, wav.numel() / speech.sample_rate,
                                 gen.stop_reason, frames))
    return results
