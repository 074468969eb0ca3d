"""SODA documents from codes and text ids (SODA_SPEC section 1), as flat int32 token arrays.

With ``A_i`` the frame-major audio ids of segment ``i`` and ``T_i`` its text ids:

* ``audio_first``: ``BOS <|audio_start|> A1 <|audio_end|> <|text_start|> T1 <|text_end|>
  <|audio_start|> A2 <|audio_end|> <|text_start|> T2 <|text_end|> ... EOS``
* ``text_first``: ``BOS <|text_start|> T1 <|text_end|> <|audio_start|> A1 <|audio_end|> ... EOS``
* ``speech_only``: ``BOS <|audio_start|> A <|audio_end|> EOS`` over the whole recording
  (gaps between segments included: it is continuous speech);
* ``semantic_only``: the same with codebook 0 only (one id per frame);
* ``text_only``: ``BOS text EOS``;
* ``s2st`` (fine-tuning, SODA_SPEC section 6), source audio ``SA`` and text ``ST``, target text
  ``TT`` and audio ``TA``: ``BOS <|audio_start|> SA <|audio_end|> <|text_start|> ST <|text_end|>
  <|text_start|> TT <|text_end|> <|audio_start|> TA <|audio_end|> EOS``.

A recording with segments yields both interleaved orders; the audio of segment ``[start,
end)`` seconds is frames ``floor(start * rate) .. ceil(end * rate)`` of the recording's codes
(every frame that overlaps the segment). Loss masks are all ones for the pretraining types.
An ``s2st`` document's mask is 0 over the source part (BOS, the source audio span and the
source text span with their markers: the instruction, given at inference) and 1 from the
target text's ``<|text_start|>`` to EOS. The mask is per token; the loader shifts it with the
labels, so the first target token is learnt from the context of the whole source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from soda_mega.tokens.layout import VocabLayout

INTERLEAVED = ("audio_first", "text_first")
AUDIO_ONLY = ("speech_only", "semantic_only")


@dataclass
class Document:
    """One MDS sample: token ids, loss mask, type and source record."""

    doc_type: str
    tokens: np.ndarray  # int32
    loss_mask: np.ndarray  # uint8, same length
    record_id: str


def audio_ids(layout: VocabLayout, codes: np.ndarray) -> np.ndarray:
    """Codes ``[K', T]`` -> frame-major audio ids ``[K' * T]`` (int64)."""
    return layout.codes_to_ids(torch.from_numpy(np.ascontiguousarray(codes))).numpy()


def _wrap(layout: VocabLayout, parts: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
    body = [np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]
    return np.concatenate([[layout.bos_id], *body, [layout.eos_id]]).astype(np.int32)


def interleaved(layout: VocabLayout, segment_codes: Sequence[np.ndarray],
                segment_text: Sequence[Sequence[int]], audio_first: bool) -> np.ndarray:
    """Utterance-level interleaving of segments in either order."""
    if len(segment_codes) != len(segment_text) or not segment_codes:
        raise ValueError("need one text per audio segment, and at least one segment")
    a0, a1 = [layout.audio_start], [layout.audio_end]
    t0, t1 = [layout.text_start], [layout.text_end]
    parts: list = []
    for codes, text in zip(segment_codes, segment_text):
        audio = [a0, audio_ids(layout, codes), a1]
        words = [t0, text, t1]
        parts += audio + words if audio_first else words + audio
    return _wrap(layout, parts)


def speech_only(layout: VocabLayout, codes: np.ndarray) -> np.ndarray:
    """``BOS <|audio_start|> A <|audio_end|> EOS`` with all K codebooks."""
    return _wrap(layout, [[layout.audio_start], audio_ids(layout, codes), [layout.audio_end]])


def semantic_only(layout: VocabLayout, codes: np.ndarray) -> np.ndarray:
    """``BOS <|audio_start|> c0[0] c0[1] ... <|audio_end|> EOS`` (codebook 0 only)."""
    return speech_only(layout, codes[:1])


def text_only(layout: VocabLayout, text_ids: Sequence[int]) -> np.ndarray:
    """``BOS text EOS``."""
    return _wrap(layout, [text_ids])


def segment_frames(start: float, end: float | None, frame_rate: float, num_frames: int) -> tuple[int, int]:
    """Frames ``[first, stop)`` overlapping ``[start, end)`` seconds, clipped to the recording."""
    # NOTE: 1e-6 s slack so that a boundary written as 0.08 (= frame 1 exactly) is not pushed
    # into the neighbouring frame by float rounding.
    first = max(0, math.floor(start * frame_rate + 1e-6))
    stop = num_frames if end is None else min(num_frames, math.ceil(end * frame_rate - 1e-6))
    return first, stop


def recording_documents(layout: VocabLayout, record_id: str, codes: np.ndarray,
                        segments: Sequence[tuple[int, int, Sequence[int]]] | None,
                        doc_types: Sequence[str]) -> list[Document]:
    """The documents of one recording, in the order of ``doc_types``.

    ``codes`` is ``[K, T]`` for the whole recording; ``segments`` holds ``(first_frame,
    stop_frame, text_ids)`` per transcribed segment, or None when untranscribed (then only
    the audio-only types are built).
    """
    docs = []
    for doc_type in doc_types:
        if doc_type in INTERLEAVED:
            if not segments:
                continue
            tokens = interleaved(layout, [codes[:, a:b] for a, b, _ in segments],
                                 [t for _, _, t in segments], audio_first=doc_type == "audio_first")
        elif doc_type == "speech_only":
            tokens = speech_only(layout, codes)
        elif doc_type == "semantic_only":
            tokens = semantic_only(layout, codes)
        else:
            raise ValueError(f"cannot build {doc_type!r} documents from a recording")
        docs.append(Document(doc_type, tokens, np.ones(len(tokens), np.uint8), record_id))
    return docs


def text_document(layout: VocabLayout, record_id: str, text_ids: Sequence[int]) -> Document:
    """A ``text_only`` document."""
    tokens = text_only(layout, text_ids)
    return Document("text_only", tokens, np.ones(len(tokens), np.uint8), record_id)


def s2st(layout: VocabLayout, source_codes: np.ndarray, source_text: Sequence[int],
         target_text: Sequence[int], target_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and loss mask of one speech-to-speech translation pair (source part masked)."""
    if len(source_text) == 0 or len(target_text) == 0:
        raise ValueError("an s2st document needs non-empty source and target text ids")
    a0, a1 = [layout.audio_start], [layout.audio_end]
    t0, t1 = [layout.text_start], [layout.text_end]
    source = [a0, audio_ids(layout, source_codes), a1, t0, source_text, t1]
    target = [t0, target_text, t1, a0, audio_ids(layout, target_codes), a1]
    tokens = _wrap(layout, source + target)
    prompt = 1 + sum(len(np.asarray(p).reshape(-1)) for p in source)  # BOS + source part
    mask = np.zeros(len(tokens), np.uint8)
    mask[prompt:] = 1
    return tokens, mask


def s2st_document(layout: VocabLayout, record_id: str, source_codes: np.ndarray,
                  source_text: Sequence[int], target_text: Sequence[int],
                  target_codes: np.ndarray) -> Document:
    """An ``s2st`` document (see :func:`s2st`)."""
    tokens, mask = s2st(layout, source_codes, source_text, target_text, target_codes)
    return Document("s2st", tokens, mask, record_id)
