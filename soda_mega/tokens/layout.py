"""The flat SODA vocabulary as a value: text ids, special ids, then K audio codebooks.

Layout (SODA_SPEC section 1, default values in brackets)::

    [0, T)                      text tokenizer ids              [T = 128256, Llama-3 BPE]
    [T, T + S)                  special ids, in order           [<|text_start|>, <|text_end|>,
                                                                  <|audio_start|>, <|audio_end|>]
    [A + k*C, A + (k+1)*C)      codebook k, A = T + S           [A = 128260, C = 2048, K = 8]
    [A + K*C, padded)           TP padding rows, never predicted

Codebook 0 is Mimi's semantic codebook, 1..K-1 are acoustic. Audio is flattened frame-major
with no delay pattern: frame t is ``c0[t], c1[t], ..., c_{K-1}[t]``.

Every range is derived from the four numbers of :class:`~soda_mega.config.VocabConfig`, so
other tokenizers, codebook counts (1..32) and sizes work without code changes, and
:meth:`VocabLayout.modality` maps any id tensor to its modality in one vectorised pass.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch

from soda_mega.config.fields import ConfigError
from soda_mega.config.schema import MAX_CODEBOOK_SIZE, MAX_TEXT_VOCAB, MAX_VOCAB, SODA_SPECIAL_TOKENS, VocabConfig


class Modality(IntEnum):
    """Coarse modality of a token id. Acoustic codebook k is ``ACOUSTIC + k - 1``."""

    PAD = -1  # padded vocabulary rows and ignored positions
    TEXT = 0
    SPECIAL = 1
    SEMANTIC = 2  # codebook 0
    ACOUSTIC = 3  # codebook 1; codebook k >= 1 has id ACOUSTIC + k - 1


#: Per-modality loss buckets used for logging: text, semantic, acoustic (all acoustic codebooks).
LOSS_GROUPS = ("text", "semantic", "acoustic")


@dataclass(frozen=True)
class VocabLayout:
    """Id ranges of one flat text + special + audio vocabulary."""

    text_vocab_size: int = 128256
    special_tokens: tuple[str, ...] = SODA_SPECIAL_TOKENS
    num_codebooks: int = 8
    codebook_size: int = 2048
    bos_id: int = 128000
    eos_id: int = 128001

    def __post_init__(self) -> None:
        if not 1 <= self.num_codebooks <= 32:
            raise ConfigError(f"vocab.num_codebooks: must be in 1..32, got {self.num_codebooks}")
        if not 2 <= self.codebook_size <= MAX_CODEBOOK_SIZE:
            raise ConfigError(f"vocab.codebook_size: must be in 2..{MAX_CODEBOOK_SIZE}, got "
                              f"{self.codebook_size}")
        if not 1 <= self.text_vocab_size <= MAX_TEXT_VOCAB:
            raise ConfigError(f"vocab.text_vocab_size: must be in 1..{MAX_TEXT_VOCAB}, got "
                              f"{self.text_vocab_size}")
        if self.size > MAX_VOCAB:
            raise ConfigError(f"vocab.codebook_size: the vocabulary would hold {self.size:,} ids; "
                              f"at most {MAX_VOCAB:,} are allowed")
        for name in ("bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.text_vocab_size:
                raise ConfigError(f"vocab.{name}: must lie in the text range [0, {self.text_vocab_size})")
        if self.bos_id == self.eos_id:
            raise ConfigError(
                f"vocab.eos_id: must differ from vocab.bos_id (both are {self.eos_id}); "
                "document boundaries would be ambiguous"
            )
        missing = [t for t in SODA_SPECIAL_TOKENS if t not in self.special_tokens]
        if missing:
            raise ConfigError(f"vocab.special_tokens: must include {', '.join(missing)}")
        duplicates = sorted({t for t in self.special_tokens if self.special_tokens.count(t) > 1})
        if duplicates:
            raise ConfigError(
                f"vocab.special_tokens: names must be unique, {', '.join(duplicates)} appear more than once"
            )

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: VocabConfig) -> VocabLayout:
        return cls(
            text_vocab_size=cfg.text_vocab_size,
            special_tokens=tuple(cfg.special_tokens),
            num_codebooks=cfg.num_codebooks,
            codebook_size=cfg.codebook_size,
            bos_id=cfg.bos_id,
            eos_id=cfg.eos_id,
        )

    @classmethod
    def soda_default(cls) -> VocabLayout:
        """The 144,644-id vocabulary of SODA_SPECS section 1."""
        return cls()

    # ----------------------------------------------------------------- ranges
    @property
    def special_base(self) -> int:
        return self.text_vocab_size

    @property
    def audio_base(self) -> int:
        return self.text_vocab_size + len(self.special_tokens)

    @property
    def size(self) -> int:
        """Number of real ids (text + special + audio), before TP padding."""
        return self.audio_base + self.num_codebooks * self.codebook_size

    def special_id(self, name: str) -> int:
        try:
            return self.special_base + self.special_tokens.index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not a special token; have {self.special_tokens}") from None

    @property
    def text_start(self) -> int:
        return self.special_id("<|text_start|>")

    @property
    def text_end(self) -> int:
        return self.special_id("<|text_end|>")

    @property
    def audio_start(self) -> int:
        return self.special_id("<|audio_start|>")

    @property
    def audio_end(self) -> int:
        return self.special_id("<|audio_end|>")

    def codebook_range(self, k: int) -> tuple[int, int]:
        """Half-open id range of codebook ``k``."""
        if not 0 <= k < self.num_codebooks:
            raise IndexError(f"codebook {k} outside 0..{self.num_codebooks - 1}")
        start = self.audio_base + k * self.codebook_size
        return start, start + self.codebook_size

    def padded_size(self, tensor_parallel: int = 1, divisible_by: int = 128) -> int:
        """Vocabulary rows after padding to a multiple of ``divisible_by * tensor_parallel``."""
        multiple = divisible_by * tensor_parallel
        return -(-self.size // multiple) * multiple

    # ----------------------------------------------------------------- vectorised maps
    def modality(self, ids: torch.Tensor) -> torch.Tensor:
        """Modality of each id (see :class:`Modality`); ids past :attr:`size` map to PAD.

        Returns int8 codes: TEXT, SPECIAL, SEMANTIC, ACOUSTIC + k - 1 for codebook k >= 1.
        """
        ids = ids.long()
        audio_offset = ids - self.audio_base
        codebook = torch.div(audio_offset, self.codebook_size, rounding_mode="floor")
        out = torch.where(
            ids < self.text_vocab_size,
            torch.full_like(ids, Modality.TEXT),
            torch.where(ids < self.audio_base, torch.full_like(ids, Modality.SPECIAL),
                        Modality.SEMANTIC + codebook),
        )
        out = torch.where((ids < 0) | (ids >= self.size), torch.full_like(ids, Modality.PAD), out)
        return out.to(torch.int8)

    def codebook_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Codebook index of each audio id, -1 for every other id."""
        ids = ids.long()
        is_audio = (ids >= self.audio_base) & (ids < self.size)
        cb = torch.div(ids - self.audio_base, self.codebook_size, rounding_mode="floor")
        return torch.where(is_audio, cb, torch.full_like(cb, -1))

    def loss_group(self, ids: torch.Tensor) -> torch.Tensor:
        """Index into :data:`LOSS_GROUPS` (0 text incl. special, 1 semantic, 2 acoustic), -1 pad."""
        mod = self.modality(ids).long()
        group = torch.where(mod <= Modality.SPECIAL, 0, torch.where(mod == Modality.SEMANTIC, 1, 2))
        return torch.where(mod == Modality.PAD, -1, group).to(torch.int8)

    # ----------------------------------------------------------------- audio <-> ids
    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Frame-major flatten: codes ``[K', T]`` (K' <= K codebooks) -> ids ``[K' * T]``."""
        if codes.dim() != 2:
            raise ValueError(f"codes must be [num_codebooks, frames], got shape {tuple(codes.shape)}")
        k = codes.shape[0]
        if not 1 <= k <= self.num_codebooks:
            raise ValueError(f"codes have {k} codebooks; this layout holds 1..{self.num_codebooks}")
        codes = codes.long()
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        offsets = self.audio_base + torch.arange(k, device=codes.device) * self.codebook_size
        return (codes + offsets[:, None]).t().reshape(-1)

    def ids_to_codes(self, ids: torch.Tensor, num_codebooks: int | None = None) -> torch.Tensor:
        """Inverse of :meth:`codes_to_ids`: ids ``[K' * T]`` -> codes ``[K', T]``.

        ``num_codebooks`` is K' (1..K), the codebooks per frame in ``ids``; None means all K.
        """
        k = self.num_codebooks if num_codebooks is None else num_codebooks
        if not 1 <= k <= self.num_codebooks:
            raise ValueError(f"num_codebooks must be in 1..{self.num_codebooks} for this layout, got {k}")
        if ids.dim() != 1 or ids.numel() % k:
            raise ValueError(f"ids must be 1-D with a multiple of {k} entries, got {tuple(ids.shape)}")
        frames = ids.long().view(-1, k).t()
        expected = self.audio_base + torch.arange(k, device=ids.device)[:, None] * self.codebook_size
        codes = frames - expected
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError("ids are not frame-major audio ids of this layout (wrong slot or range)")
        return codes

    # ----------------------------------------------------------------- identity
    def to_dict(self) -> dict:
        return {
            "text_vocab_size": self.text_vocab_size,
            "special_tokens": list(self.special_tokens),
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }

    @classmethod
    def from_dict(cls, data: dict) -> VocabLayout:
        data = dict(data)
        data["special_tokens"] = tuple(data["special_tokens"])
        return cls(**data)

    def fingerprint(self) -> str:
        """Stable hash of the layout, stored with datasets and checkpoints."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> list[tuple[str, int, int]]:
        """(name, first id, end id) for every range, for printing."""
        rows = [("text", 0, self.text_vocab_size)]
        rows += [(name, self.special_id(name), self.special_id(name) + 1) for name in self.special_tokens]
        for k in range(self.num_codebooks):
            kind = "semantic" if k == 0 else "acoustic"
            rows.append((f"codebook {k} ({kind})", *self.codebook_range(k)))
        return rows


def modality_names(num_codebooks: int) -> Sequence[str]:
    """Human names of the :class:`Modality` codes 0.. for ``num_codebooks`` codebooks."""
    return ["text", "special", "semantic"] + [f"acoustic{k}" for k in range(1, num_codebooks)]
