"""Batched autoregressive generation with a KV cache and structure-aware decoding.

The prompts of a batch are left-padded and prefilled in one forward pass; then each step
feeds one token per row through the cache. A row stops at the first of its ``stop_ids``
(kept in its output), at EOS, or after ``max_new_tokens``; finished rows are carried along
as padding until every row is done. With ``structured=True`` (the default) each step's
choice is restricted by :class:`~soda_mega.inference.structure.StructureTracker`, so
audio spans always hold whole, in-codebook frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from soda_mega.inference.decoder import SodaDecoder, left_pad
from soda_mega.inference.sampling import GREEDY, Sampling, choose
from soda_mega.inference.structure import StructureTracker


@dataclass
class Generation:
    """One row's output: the new ids (the stop id included) and why it ended."""

    tokens: list[int]
    stop_reason: str  # "stop_id", "eos", "max_new_tokens"


@torch.no_grad()
def generate(decoder: SodaDecoder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = GREEDY, stop_ids: Sequence[int] = (), structured: bool = True,
             plan: Sequence[str] | None = None, audio_codebooks: int | None = None,
             seed: int = 0, batch_size: int | None = None,
             max_text_tokens: int | None = None) -> list[Generation]:
    """Continue each prompt; returns one :class:`Generation` per prompt, in order.

    ``batch_size`` splits many prompts into batches (default: all at once);
    ``max_text_tokens`` closes text spans at that length (structured decoding only).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [list(map(int, p)) for p in prompts]
    size = batch_size or len(prompts)
    out: list[Generation] = []
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for first in range(0, len(prompts), size):
        out += _generate_batch(decoder, prompts[first:first + size], max_new_tokens, sampling,
                               set(stop_ids), structured, plan, audio_codebooks, generator,
                               max_text_tokens)
    return out


def _generate_batch(decoder, prompts, max_new_tokens, sampling, stop_ids, structured, plan,
                    audio_codebooks, generator, max_text_tokens) -> list[Generation]:
    layout = decoder.layout
    bad = [t for p in prompts for t in p if not 0 <= t < layout.size]
    if bad:
        raise ValueError(f"prompt ids outside the vocabulary [0, {layout.size}): {bad[:5]}")
    tokens, pad = left_pad(prompts, layout.eos_id)
    batch = len(prompts)
    tracker = None
    if structured:
        tracker = StructureTracker(layout, batch, audio_codebooks, plan, decoder.device,
                                   max_text_tokens)
        tracker.observe_prompt(tokens, pad)
    cache = decoder.new_cache(pad, tokens.shape[1] + max_new_tokens)
    logits = decoder(tokens, cache=cache, last_only=True)
    done = torch.zeros(batch, dtype=torch.bool)
    reasons = ["max_new_tokens"] * batch
    generated: list[list[int]] = [[] for _ in range(batch)]
    stop = torch.tensor(sorted(stop_ids | {layout.eos_id}), dtype=torch.long)
    for step in range(max_new_tokens):
        allowed = tracker.allowed() if tracker is not None else None
        nxt = choose(logits, sampling, allowed, generator).cpu()
        nxt = torch.where(done, torch.full_like(nxt, layout.eos_id), nxt)
        for row in (~done).nonzero()[:, 0].tolist():
            tok = int(nxt[row])
            generated[row].append(tok)
            if tok in stop_ids:
                reasons[row] = "stop_id"
            elif tok == layout.eos_id:
                reasons[row] = "eos"
        done = done | torch.isin(nxt, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if tracker is not None:
            tracker.observe(nxt)
        logits = decoder(nxt[:, None], cache=cache, last_only=True)
    return [Generation(g, r) for g, r in zip(generated, reasons)]
