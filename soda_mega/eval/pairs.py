"""Likelihood-pair tasks in the sWUGGY / sBLIMP / Salmon format (SODA_SPEC section 5).

Each item is a (positive, negative) pair of recordings. Both are encoded with the codec and
scored by the mean log-probability of their audio ids in ``BOS <|audio_start|> audio
<|audio_end|>``; the item is correct when the positive one scores strictly higher (ties count
as wrong, and are reported). Accuracy comes with a 95% Wilson score interval.

Manifest (JSONL, paths relative to it; ``.npy`` pre-encoded ``[K, T]`` codes also accepted)::

    {"id": "w001", "positive": "real/w001.wav", "negative": "fake/w001.wav"}

The benchmark audio is not shipped: point the command at your local copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from soda_mega.data.write.inputs import InputError
from soda_mega.eval.manifest import Manifest, read_manifest
from soda_mega.eval.prompts import likelihood_item
from soda_mega.eval.speech_io import SpeechIO
from soda_mega.inference.decoder import SodaDecoder

FIELDS = ("positive", "negative")


@dataclass
class PairResult:
    id: str
    positive: float
    negative: float

    @property
    def correct(self) -> bool:
        return self.positive > self.negative


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at 0 and n, unlike Wald)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def mean_audio_logprobs(decoder: SodaDecoder, audios: Sequence[Sequence[int]],
                        batch_size: int = 16) -> list[float]:
    """Mean log p of the audio ids of each ``BOS <|audio_start|> audio <|audio_end|>``.

    Sequences are batched longest first (similar lengths share a batch: little padding).
    """
    layout = decoder.layout
    items = [likelihood_item(layout, a) for a in audios]
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    scores = [0.0] * len(items)
    for first in range(0, len(order), batch_size):
        idx = order[first:first + batch_size]
        logps = decoder.token_logprobs([items[i][0] for i in idx])
        for i, lp in zip(idx, logps):
            scores[i] = float(lp[items[i][1]].double().mean())
    return scores


def load_pairs(path, speech: SpeechIO, max_tokens: int, skip_bad: bool = False
               ) -> tuple[list[tuple[str, list[int], list[int]]], Manifest]:
    """Encoded (id, positive ids, negative ids); unusable audio raises or is skipped."""
    manifest = read_manifest(path, required=FIELDS, paths=FIELDS, skip_bad=skip_bad)
    encoded = speech.audio_ids_many([item[key] for item in manifest.items for key in FIELDS])
    pairs = []
    for n, item in enumerate(manifest.items):
        try:
            sides = encoded[2 * n: 2 * n + 2]
            for key, ids in zip(FIELDS, sides):
                if isinstance(ids, InputError):
                    raise InputError(f"{key}: {ids}")
                if len(ids) + 3 > max_tokens:
                    raise InputError(f"{key}: {len(ids) + 3} tokens exceed the model's context of "
                                     f"{max_tokens} (model.seq_length); shorten the audio")
        except InputError as err:
            if not skip_bad:
                raise InputError(f"{item.where} ({item.id}): {err}") from None
            manifest.skipped.append({"item": item.id, "where": item.where, "reason": str(err)})
            continue
        pairs.append((item.id, sides[0], sides[1]))
    return pairs, manifest


def evaluate_pairs(decoder: SodaDecoder, pairs, batch_size: int = 16) -> tuple[list[PairResult], dict]:
    """Per-item results and the summary (n, correct, ties, accuracy, 95% interval)."""
    audios = [a for _, pos, neg in pairs for a in (pos, neg)]
    scores = mean_audio_logprobs(decoder, audios, batch_size)
    results = [PairResult(pid, scores[2 * i], scores[2 * i + 1]) for i, (pid, _, _) in enumerate(pairs)]
    n = len(results)
    correct = sum(r.correct for r in results)
    low, high = wilson_interval(correct, n)
    summary = {"n": n, "correct": correct, "ties": sum(r.positive == r.negative for r in results),
               "accuracy": correct / n if n else float("nan"), "ci95": [low, high],
               "mean_positive_logprob": sum(r.positive for r in results) / max(n, 1),
               "mean_negative_logprob": sum(r.negative for r in results) / max(n, 1)}
    return results, summary
