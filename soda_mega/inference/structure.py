"""Structure-aware decoding: which ids may come next, from the token stream's grammar.

SODA's stream (SODA_SPEC section 1) is a sequence of spans::

    BOS ( <|text_start|> text <|text_end|> | <|audio_start|> frames <|audio_end|> )* EOS
    BOS text EOS                                   (text-only documents)

where a frame is ``K`` ids, position ``k`` drawn from codebook ``k``. A tracker follows each
row of a batch through this grammar, one token at a time (prompt tokens included), and gives
the mask of ids allowed next:

=================  ==========================================================================
state              allowed next
=================  ==========================================================================
between spans      ``<|text_start|>``, ``<|audio_start|>``, EOS, or text (a text-only document)
in a text span     text ids (not BOS/EOS), ``<|text_end|>``
free text          text ids (not BOS), EOS
audio, slot ``k``  codebook ``k``; at ``k = 0`` (a frame boundary) also ``<|audio_end|>``
finished           EOS (the row is padding after its EOS)
=================  ==========================================================================

So generated audio spans always hold whole frames with every id in its codebook, and always
decode. An optional span ``plan`` (e.g. ``["text", "text", "audio"]`` for translation) forces
the opener of each next span and ends the row with EOS after the last one, and
``max_text_tokens`` closes a text span that has grown that long (a model stuck repeating
itself still gets to the spans after it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soda_mega.tokens.layout import VocabLayout

BETWEEN, TEXT, FREE_TEXT, FINISHED = 0, 1, 2, 3
AUDIO0 = 4  # audio slot k is state AUDIO0 + k


class StructureTracker:
    """Grammar state of each row of a batch, advanced token by token."""

    def __init__(self, layout: VocabLayout, batch: int, audio_codebooks: int | None = None,
                 plan: Sequence[str] | None = None, device: str | torch.device = "cpu",
                 max_text_tokens: int | None = None) -> None:
        self.layout = layout
        self.k = audio_codebooks or layout.num_codebooks
        if not 1 <= self.k <= layout.num_codebooks:
            raise ValueError(f"audio_codebooks must be in 1..{layout.num_codebooks}, got {self.k}")
        bad = [p for p in plan or () if p not in ("text", "audio")]
        if bad:
            raise ValueError(f"plan entries must be 'text' or 'audio', got {bad}")
        self.plan = list(plan) if plan is not None else None
        self.device = torch.device(device)
        self.state = torch.full((batch,), BETWEEN, dtype=torch.long, device=self.device)
        # spans of the plan already opened, per row (only used with a plan)
        self.opened = torch.zeros(batch, dtype=torch.long, device=self.device)
        if max_text_tokens is not None and max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {max_text_tokens}")
        self.max_text_tokens = max_text_tokens
        self.span_length = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.table = self._allowed_table().to(self.device)

    def _allowed_table(self) -> torch.Tensor:
        lay = self.layout
        table = torch.zeros(AUDIO0 + self.k, lay.size, dtype=torch.bool)
        text = torch.zeros(lay.size, dtype=torch.bool)
        text[:lay.text_vocab_size] = True
        text[[lay.bos_id, lay.eos_id]] = False
        table[BETWEEN, [lay.text_start, lay.audio_start, lay.eos_id]] = True
        table[BETWEEN] |= text
        table[TEXT] = text
        table[TEXT, lay.text_end] = True
        table[FREE_TEXT] = text
        table[FREE_TEXT, lay.eos_id] = True
        table[FINISHED, lay.eos_id] = True
        for k in range(self.k):
            lo, hi = lay.codebook_range(k)
            table[AUDIO0 + k, lo:hi] = True
        table[AUDIO0, lay.audio_end] = True
        return table

    def allowed(self) -> torch.Tensor:
        """``[B, V]`` boolean mask of the ids each row may emit next."""
        mask = self.table[self.state]
        if self.max_text_tokens is not None:
            full = (self.state == TEXT) & (self.span_length >= self.max_text_tokens)
            if full.any():
                close = torch.zeros_like(mask)
                close[:, self.layout.text_end] = True
                mask = torch.where(full[:, None], close, mask)
        if self.plan is not None:
            between = self.state == BETWEEN
            if between.any():
                forced = torch.zeros_like(mask)
                n = len(self.plan)
                opener = {"text": self.layout.text_start, "audio": self.layout.audio_start}
                for row in between.nonzero()[:, 0].tolist():
                    i = int(self.opened[row])
                    forced[row, opener[self.plan[i]] if i < n else self.layout.eos_id] = True
                mask = torch.where(between[:, None], forced, mask)
        return mask

    def observe(self, tokens: torch.Tensor) -> None:
        """Advance every row by one token (``[B]``)."""
        lay, s = self.layout, self.state
        t = tokens.to(self.device)
        is_text = (t < lay.text_vocab_size) & (t != lay.bos_id) & (t != lay.eos_id)
        new = s.clone()
        new = torch.where((s == BETWEEN) & (t == lay.text_start), TEXT, new)
        new = torch.where((s == BETWEEN) & (t == lay.audio_start), AUDIO0, new)
        new = torch.where((s == BETWEEN) & is_text, FREE_TEXT, new)
        new = torch.where((s == TEXT) & (t == lay.text_end), BETWEEN, new)
        in_audio = s >= AUDIO0
        new = torch.where(in_audio & (t == lay.audio_end), BETWEEN, new)
        advance = in_audio & (t >= lay.audio_base)
        new = torch.where(advance, AUDIO0 + (s - AUDIO0 + 1) % self.k, new)
        new = torch.where((t == lay.eos_id) & (s != TEXT), FINISHED, new)
        # BOS starts a document afresh (prompts begin with it).
        new = torch.where(t == lay.bos_id, BETWEEN, new)
        opens = (s == BETWEEN) & ((t == lay.text_start) | (t == lay.audio_start))
        self.opened = self.opened + opens.long()
        self.span_length = torch.where(new == s, self.span_length + 1, torch.zeros_like(self.span_length))
        self.state = new

    def observe_prompt(self, tokens: torch.Tensor, pad: torch.Tensor) -> None:
        """Feed left-padded prompts ``[B, T]`` (padding ignored)."""
        for j in range(tokens.shape[1]):
            keep = self.state.clone(), self.opened.clone(), self.span_length.clone()
            self.observe(tokens[:, j])
            padded = (j < pad).to(self.device)
            self.state = torch.where(padded, keep[0], self.state)
            self.opened = torch.where(padded, keep[1], self.opened)
            self.span_length = torch.where(padded, keep[2], self.span_length)
        # The plan counts spans opened after the prompt.
        self.opened.zero_()


def violations(layout: VocabLayout, tokens: Sequence[int], audio_codebooks: int | None = None,
               start_state: str = "between") -> list[str]:
    """Independent checker (no tracker code): every way ``tokens`` break the grammar.

    Used by the tests and by generation reports; ``start_state`` is "between", "text" or
    "audio" (the continuation of a prompt that opened a span); a leading BOS is accepted.
    """
    k_total = audio_codebooks or layout.num_codebooks
    problems: list[str] = []
    mode, slot = start_state, 0
    for i, tok in enumerate(int(t) for t in tokens):
        if i == 0 and tok == layout.bos_id and mode == "between":
            continue  # a document's first token
        if mode == "finished":
            if tok != layout.eos_id:
                problems.append(f"{i}: id {tok} after EOS")
            continue
        if mode == "audio":
            if tok == layout.audio_end:
                if slot != 0:
                    problems.append(f"{i}: <|audio_end|> inside a frame (slot {slot})")
                mode = "between"
                continue
            if tok < layout.audio_base:
                problems.append(f"{i}: id {tok} inside an audio span")
                continue
            cb = (tok - layout.audio_base) // layout.codebook_size
            if cb != slot:
                problems.append(f"{i}: codebook {cb} id in slot {slot}")
            slot = (slot + 1) % k_total
        elif mode in ("text", "free"):
            if tok == layout.text_end and mode == "text":
                mode = "between"
            elif tok == layout.eos_id and mode == "free":
                mode = "finished"
            elif not (tok < layout.text_vocab_size and tok not in (layout.bos_id, layout.eos_id)):
                problems.append(f"{i}: id {tok} inside a text span")
        else:  # between
            if tok == layout.text_start:
                mode = "text"
            elif tok == layout.audio_start:
                mode, slot = "audio", 0
            elif tok == layout.eos_id:
                mode = "finished"
            elif tok < layout.text_vocab_size and tok != layout.bos_id:
                mode = "free"
            else:
                problems.append(f"{i}: id {tok} between spans")
    return problems
