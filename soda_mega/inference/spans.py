"""Cut a token stream into its text and audio spans (the inverse of the document layout)."""

from __future__ import annotations

from collections.abc import Sequence

from soda_mega.tokens.layout import VocabLayout


def split_spans(layout: VocabLayout, tokens: Sequence[int]) -> list[tuple[str, list[int]]]:
    """``[("text" | "audio", ids inside the markers), ...]`` in stream order.

    A span still open at the end of ``tokens`` (generation cut by its token budget) is
    returned with what it holds.
    """
    spans: list[tuple[str, list[int]]] = []
    current: tuple[str, list[int]] | None = None
    opener = {layout.text_start: "text", layout.audio_start: "audio"}
    closer = {layout.text_end: "text", layout.audio_end: "audio"}
    for tok in map(int, tokens):
        if current is None:
            if tok in opener:
                current = (opener[tok], [])
        elif closer.get(tok) == current[0]:
            spans.append(current)
            current = None
        else:
            current[1].append(tok)
    if current is not None:
        spans.append(current)
    return spans
