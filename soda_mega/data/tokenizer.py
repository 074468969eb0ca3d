"""Text tokenizers for the text range of the vocabulary.

Two implementations of :class:`TextTokenizer`:

* :class:`HFTokenizer`: a HuggingFace ``tokenizer.json`` read from a local path with the
  ``tokenizers`` library (SODA uses the Llama-3 BPE: 128,256 ids, BOS 128000, EOS 128001).
* :class:`ByteTokenizer`: the embedded fallback when no tokenizer is given: UTF-8 bytes are
  ids 0..255; BOS and EOS come from the layout (the ``tiny`` preset: 256 and 257, so
  ``text_vocab_size`` 258). It is announced on stderr whenever it is picked.

The vocabulary layout is a config value (:class:`~soda_mega.tokens.layout.VocabLayout`);
:func:`load_tokenizer` checks that the layout's text range holds every id the tokenizer can
produce and that BOS/EOS do not collide with ordinary ids, and tells the user which
``vocab.*`` settings fit the tokenizer when they do not. Encoding never adds BOS/EOS: the
document builders place them.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from soda_mega.config.fields import ConfigError
from soda_mega.data.codec import file_sha256
from soda_mega.tokens.layout import VocabLayout

BYTE_TOKENIZER_ID = "soda-mega/byte-tokenizer/1"
# Token strings that HF tokenizers commonly use for document boundaries, most specific first.
_BOS_NAMES = ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "[BOS]")
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]")


@runtime_checkable
class TextTokenizer(Protocol):
    """Text <-> ids in ``[0, vocab_size)``, without BOS/EOS."""

    kind: str

    @property
    def vocab_size(self) -> int:
        """One past the largest id :meth:`encode` can return."""

    def encode(self, text: str) -> list[int]:
        ...

    def decode(self, ids: Sequence[int]) -> str:
        ...

    def metadata(self) -> dict:
        """The ``tokenizer`` entry of ``soda_meta.json``: kind, path, sha256."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 (the embedded fallback)."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        # NOTE: strict UTF-8: a lone surrogate (possible in JSON input) raises UnicodeEncodeError,
        # which the builder reports as a bad record instead of writing replacement bytes.
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def metadata(self) -> dict:
        return {"kind": self.kind, "path": None,
                "sha256": hashlib.sha256(BYTE_TOKENIZER_ID.encode()).hexdigest()}


# A tokenizer.json is a few MB (Qwen3's is 11 MB); a file far beyond that is not one, and reading
# it whole would only cost memory.
MAX_TOKENIZER_BYTES = 256 << 20


class HFTokenizer:
    """A local HuggingFace ``tokenizer.json`` (``tokenizers.Tokenizer.from_file``)."""

    kind = "hf"

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.is_file():  # also refuses a FIFO or a device, which would block the read
            what = "is not a regular file" if self.path.exists() else "does not exist"
            raise ConfigError(f"data.tokenizer: {str(self.path)[:300]!r} {what}; give the path of a "
                              "local tokenizer.json (nothing is downloaded)")
        size = self.path.stat().st_size
        if size > MAX_TOKENIZER_BYTES:
            raise ConfigError(f"data.tokenizer: {str(self.path)[:300]!r} is {size:,} bytes, more than "
                              f"any tokenizer.json ({MAX_TOKENIZER_BYTES:,} at most)")
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as err:  # the Rust side raises plain Exception subclasses
            raise ConfigError(f"data.tokenizer: {str(self.path)[:300]!r} is not a HuggingFace "
                              f"tokenizer.json ({str(err)[:200]})") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.sha256 = file_sha256(self.path)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(idx)

    def boundary_ids(self) -> tuple[int | None, int | None]:
        """(BOS, EOS) ids found under common names in the tokenizer, None where absent."""
        def first(names: Sequence[str]) -> int | None:
            for name in names:
                idx = self._tok.token_to_id(name)
                if idx is not None:
                    return idx
            return None
        return first(_BOS_NAMES), first(_EOS_NAMES)

    def metadata(self) -> dict:
        return {"kind": self.kind, "path": str(self.path.resolve()), "sha256": self.sha256}


def check_fits(tokenizer: TextTokenizer, layout: VocabLayout) -> list[str]:
    """Raise :class:`ConfigError` when ``tokenizer`` does not fit ``layout``; return warnings."""
    warnings: list[str] = []
    if tokenizer.vocab_size > layout.text_vocab_size:
        hint = ""
        if isinstance(tokenizer, HFTokenizer):
            bos, eos = tokenizer.boundary_ids()
            hint = (f"; for this tokenizer use --vocab.text_vocab_size={tokenizer.vocab_size}"
                    + (f" --vocab.bos_id={bos}" if bos is not None else "")
                    + (f" --vocab.eos_id={eos}" if eos is not None else ""))
        raise ConfigError(f"vocab.text_vocab_size: {layout.text_vocab_size} is too small for the "
                          f"{tokenizer.kind} tokenizer, whose ids reach {tokenizer.vocab_size - 1}{hint}")
    if isinstance(tokenizer, ByteTokenizer):
        for name in ("bos_id", "eos_id"):
            if getattr(layout, name) < 256:
                raise ConfigError(f"vocab.{name}: {getattr(layout, name)} is a byte id of the byte-level "
                                  "tokenizer; put BOS/EOS at 256/257 (the tiny preset) or give data.tokenizer")
        if layout.text_vocab_size > 258:
            warnings.append(f"the byte-level tokenizer uses ids 0..255 and BOS/EOS; text ids "
                            f"258..{layout.text_vocab_size - 1} of this layout stay unused "
                            "(the tiny preset sets vocab.text_vocab_size=258)")
    if isinstance(tokenizer, HFTokenizer):
        bos, eos = tokenizer.boundary_ids()
        for name, found in (("bos_id", bos), ("eos_id", eos)):
            want = getattr(layout, name)
            if found is not None and found != want:
                warnings.append(f"vocab.{name}={want} ({tokenizer.id_to_token(want)!r}) but the tokenizer "
                                f"names {tokenizer.id_to_token(found)!r} = {found}; set --vocab.{name}={found} "
                                "if that is the boundary token you mean")
    return warnings


def load_tokenizer(path: str | Path | None, layout: VocabLayout, announce: bool = True) -> TextTokenizer:
    """The tokenizer at ``path`` (None: the byte-level fallback), checked against ``layout``."""
    tokenizer: TextTokenizer = HFTokenizer(path) if path else ByteTokenizer()
    warnings = check_fits(tokenizer, layout)
    if announce:
        if isinstance(tokenizer, ByteTokenizer):
            print(f"[soda-mega data] NOTE: no text tokenizer given (data.tokenizer / --tokenizer): using "
                  f"the embedded byte-level tokenizer (UTF-8 bytes = ids 0..255, BOS {layout.bos_id}, "
                  f"EOS {layout.eos_id})", file=sys.stderr)
        else:
            print(f"[soda-mega data] text tokenizer {path} ({tokenizer.vocab_size} ids)", file=sys.stderr)
        for text in warnings:
            print(f"[soda-mega data] WARNING: {text}", file=sys.stderr)
    return tokenizer
