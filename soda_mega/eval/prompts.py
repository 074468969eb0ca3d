"""SODA's evaluation prompts (SODA_SPEC section 5) as token-id sequences.

Every prompt starts with BOS, as every training document does.

* likelihood pair item: ``BOS <|audio_start|> audio <|audio_end|>``; scored on the audio ids.
* ASR, N-shot: N x ``<|audio_start|> a <|audio_end|> <|text_start|> transcript <|text_end|>``,
  then ``<|audio_start|> test audio <|audio_end|> <|text_start|>``; greedy to ``<|text_end|>``.
* TTS, zero-shot voice prompt: ``<|text_start|> prompt text <|text_end|> <|audio_start|>
  prompt audio <|audio_end|> <|text_start|> target text <|text_end|> <|audio_start|>``;
  sampled to ``<|audio_end|>``.
* S2ST (SODA_SPEC section 6): ``<|audio_start|> source audio <|audio_end|>``; the model
  continues with source text, target text and target audio spans.
"""

from __future__ import annotations

from collections.abc import Sequence

from soda_mega.tokens.layout import VocabLayout

Ids = Sequence[int]


def audio_span(layout: VocabLayout, audio: Ids) -> list[int]:
    return [layout.audio_start, *audio, layout.audio_end]


def text_span(layout: VocabLayout, text: Ids) -> list[int]:
    return [layout.text_start, *text, layout.text_end]


def likelihood_item(layout: VocabLayout, audio: Ids) -> tuple[list[int], slice]:
    """The scored sequence and the slice of its audio ids *as prediction targets*
    (index ``i`` of ``token_logprobs`` predicts token ``i + 1``)."""
    seq = [layout.bos_id, *audio_span(layout, audio)]
    return seq, slice(1, 1 + len(audio))


def asr_prompt(layout: VocabLayout, shots: Sequence[tuple[Ids, Ids]], audio: Ids) -> list[int]:
    """``shots`` are (audio ids, transcript ids) examples."""
    seq = [layout.bos_id]
    for shot_audio, shot_text in shots:
        seq += audio_span(layout, shot_audio) + text_span(layout, shot_text)
    return seq + audio_span(layout, audio) + [layout.text_start]


def tts_prompt(layout: VocabLayout, prompt_text: Ids, prompt_audio: Ids, target_text: Ids) -> list[int]:
    return ([layout.bos_id] + text_span(layout, prompt_text) + audio_span(layout, prompt_audio)
            + text_span(layout, target_text) + [layout.audio_start])


def s2st_prompt(layout: VocabLayout, source_audio: Ids) -> list[int]:
    return [layout.bos_id, *audio_span(layout, source_audio)]
