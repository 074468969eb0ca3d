"""N-shot ASR with the model itself (SODA_SPEC section 5), and the pluggable transcriber API.

The prompt is N (audio, transcript) examples and the test audio followed by
``<|text_start|>``; decoding is greedy, structure-aware (only text ids may follow) and stops
at ``<|text_end|>``. The examples are a fixed, seeded choice from the same manifest (never
the test item itself), so every item sees the same kind of context.

A :class:`Transcriber` turns WAV files into text; TTS is scored with one. The default is
:class:`ModelASR` (this checkpoint in ASR mode); ``--asr module:attr`` loads any object (or
a factory of one) with a ``transcribe(paths) -> list[str]`` method, e.g. a wrapper around a
local Whisper checkpoint.
"""

from __future__ import annotations

import importlib
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from soda_mega.data.write.inputs import InputError
from soda_mega.eval.manifest import Manifest, read_manifest
from soda_mega.eval.prompts import asr_prompt
from soda_mega.eval.speech_io import SpeechIO
from soda_mega.inference.decoder import SodaDecoder
from soda_mega.inference.generate import generate
from soda_mega.inference.sampling import GREEDY


@dataclass
class Utterance:
    id: str
    audio: list[int]  # audio ids
    text: str
    path: str
    fields: dict


def load_utterances(path, speech: SpeechIO, skip_bad: bool = False) -> tuple[list[Utterance], Manifest]:
    """Manifest items ``{"id", "audio", "text"}`` (plus optional ``prompt_audio`` /
    ``prompt_text`` for TTS), with their audio encoded."""
    manifest = read_manifest(path, required=("audio", "text"), paths=("audio",),
                             optional_paths=("prompt_audio",), skip_bad=skip_bad)
    out = []
    encoded = speech.audio_ids_many([item["audio"] for item in manifest.items])
    for item, ids in zip(manifest.items, encoded):
        if isinstance(ids, InputError):
            if not skip_bad:
                raise InputError(f"{item.where} ({item.id}): {ids}") from None
            manifest.skipped.append({"item": item.id, "where": item.where, "reason": str(ids)})
            continue
        out.append(Utterance(item.id, ids, str(item["text"]), item["audio"], item.fields))
    if not out:
        raise InputError(f"manifest {path}: no usable utterance")
    return out, manifest


def choose_shots(utterances: Sequence[Utterance], n: int, seed: int = 0) -> list[Utterance]:
    """The seeded order in which example candidates are tried (see :func:`shots_for`)."""
    if n < 0:
        raise ValueError(f"shots must be >= 0, got {n}")
    if n >= len(utterances):
        raise ValueError(f"{n}-shot ASR needs at least {n + 1} utterances in the manifest, "
                         f"it has {len(utterances)}")
    pool = list(utterances)
    random.Random(seed).shuffle(pool)
    return pool


def shots_for(item_id: str, text: str | None, candidates: Sequence[Utterance], n: int) -> list[Utterance]:
    """The first ``n`` candidates that are neither the item nor a recording of its text
    (an example with the answer in it would leak it)."""
    from soda_mega.eval.wer import normalize

    banned = normalize(text) if text else None
    shots = [u for u in candidates if u.id != item_id and normalize(u.text) != banned][:n]
    if len(shots) < n:
        raise ValueError(f"not enough distinct examples for {n}-shot ASR of {item_id!r}: "
                         f"{len(shots)} other utterances with another transcript")
    return shots


class ContextWarning:
    """Says once when prompts run past the context length the model was trained on."""

    def __init__(self, limit: int) -> None:
        self.limit, self.said = limit, False

    def check(self, length: int, what: str) -> None:
        if length > self.limit and not self.said:
            self.said = True
            print(f"[soda-mega eval] WARNING: {what} reach {length} tokens, past the model's "
                  f"training context of {self.limit} (model.seq_length); quality degrades",
                  file=sys.stderr)


def transcribe_ids(decoder: SodaDecoder, speech: SpeechIO, audios: Sequence[Sequence[int]],
                   shots: Sequence[Sequence[Utterance]], max_new_tokens: int = 256,
                   batch_size: int = 8) -> list[str]:
    """Greedy N-shot transcripts of audio ids; ``shots[i]`` are item ``i``'s examples."""
    layout = decoder.layout
    prompts = [asr_prompt(layout, [(s.audio, speech.text_ids(s.text)) for s in item_shots], audio)
               for audio, item_shots in zip(audios, shots)]
    warn = ContextWarning(decoder.cfg.model.seq_length)
    for p in prompts:
        warn.check(len(p) + max_new_tokens, "ASR prompts")
    out = generate(decoder, prompts, max_new_tokens, GREEDY, stop_ids=[layout.text_end],
                   batch_size=batch_size)
    return [speech.text(g.tokens) for g in out]


class Transcriber(Protocol):
    def transcribe(self, paths: Sequence[Path]) -> list[str]: ...


class ModelASR:
    """The checkpoint itself in N-shot ASR mode, as a :class:`Transcriber` of WAV files.

    ``candidates`` come from :func:`choose_shots`; a file transcribed for item ``id`` never
    gets that item's own recording as an example (TTS output of a manifest sentence must
    not be scored with a real recording of that sentence in its prompt).
    """

    def __init__(self, decoder: SodaDecoder, speech: SpeechIO, candidates: Sequence[Utterance],
                 shots: int, max_new_tokens: int = 256, batch_size: int = 8) -> None:
        self.decoder, self.speech = decoder, speech
        self.candidates, self.shots = list(candidates), shots
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def transcribe(self, paths: Sequence[Path], items: Sequence[tuple[str, str]] | None = None) -> list[str]:
        """``items``: (id, reference text) of each file, kept out of its examples."""
        items = list(items) if items is not None else [("", None)] * len(paths)
        audios = self.speech.audio_ids_many(paths, strict=True)
        shots = [shots_for(i, text, self.candidates, self.shots) for i, text in items]
        return transcribe_ids(self.decoder, self.speech, audios, shots, self.max_new_tokens,
                              self.batch_size)


def load_transcriber(spec: str) -> Transcriber:
    """``module:attr``: an object with ``transcribe``, or a no-argument factory of one."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--asr {spec!r}: expected 'self' or 'module:attribute'")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--asr {spec!r}: cannot load it ({err})") from None
    if isinstance(obj, type) or (not hasattr(obj, "transcribe") and callable(obj)):
        obj = obj()  # a class or a factory
    if not callable(getattr(obj, "transcribe", None)):
        raise ValueError(f"--asr {spec!r}: {type(obj).__name__} has no transcribe(paths) method")
    return obj
