"""Word error rate with SODA's normalisation (lowercase, no punctuation), through jiwer.

Corpus WER is total edits over total reference words (not a mean of per-item rates), the
convention of LibriSpeech results.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

_PUNCT = re.compile(r"[^\w\s']|_")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, NFKC, punctuation removed (apostrophes inside words kept), one space."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"(^|\s)'+|'+(\s|$)", " ", text)  # quotes, not contractions
    return _SPACE.sub(" ", text).strip()


@dataclass
class WER:
    wer: float
    substitutions: int
    deletions: int
    insertions: int
    reference_words: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> WER:
    """Corpus WER of normalised texts; an empty hypothesis counts every word as deleted."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(f"reference {empty[0]} is empty after normalisation: {references[empty[0]]!r}")
    out = jiwer.process_words(refs, hyps)
    words = out.substitutions + out.deletions + out.hits
    return WER(out.wer, out.substitutions, out.deletions, out.insertions, words)


def item_wer(reference: str, hypothesis: str) -> float:
    return word_error_rate([reference], [hypothesis]).wer
