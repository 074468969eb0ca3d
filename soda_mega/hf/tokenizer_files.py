"""Tokenizer files of an exported model: the whole SODA vocabulary as one ``tokenizers`` tokenizer.

``AutoTokenizer.from_pretrained(OUT)`` (offline) gives every id of the flat vocabulary a
string, at exactly its layout id:

* ``[0, T)``: the run's text tokenizer. Either the local ``tokenizer.json`` named by
  ``data.tokenizer`` (kept as it is, post-processor included), or, for runs on the embedded
  byte-level fallback, an equivalent byte-level BPE: UTF-8 byte ``b`` is id ``b`` (spelled
  with GPT-2's printable byte alphabet), so encoding text gives exactly
  ``ByteTokenizer.encode(text)`` and decoding restores it. Byte-level ids at and above 256
  are BOS ``<|begin_of_text|>`` and EOS ``<|end_of_text|>`` at the layout's ids, the rest
  ``<|reserved_text_i|>``. The same ``<|reserved_text_i|>`` names fill the gap when an HF
  text tokenizer has fewer ids than ``vocab.text_vocab_size``.
* ``[T, A)``: the special tokens (``<|text_start|>``, ``<|text_end|>``, ``<|audio_start|>``,
  ``<|audio_end|>``, plus any extra names of ``vocab.special_tokens``), in layout order.
* ``[A, A + K*C)``: one token per audio id, named ``<|audio_k_x|>`` for code ``x`` of
  codebook ``k`` (id ``A + k*C + x``; ``k = 0`` is the semantic codebook).

Encoding text adds BOS in front (a post-processor), as every training document starts; the
tokenizer config names EOS as the pad token and ``input_ids`` / ``attention_mask`` as the model
inputs, so transformers' ``model.generate(**tok(...))`` and ``tok([...], padding=True)`` work.

All added tokens are "special" to ``tokenizers``: they are matched whole in input text (so a
prompt string such as ``"<|audio_start|><|audio_0_17|><|audio_1_5|>"`` encodes to the right
ids) and ``decode(..., skip_special_tokens=True)`` keeps only the text.

The reverse direction (:func:`layout_from_tokenizer`) reads the layout back from such a file,
and :func:`text_part` cuts a full tokenizer back to its text range for ``data.tokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

from soda_mega.config.schema import SODA_SPECIAL_TOKENS
from soda_mega.hf.files import HFError, file_sha256
from soda_mega.tokens.layout import VocabLayout

AUDIO_TOKEN_FORMAT = "<|audio_{k}_{x}|>"
RESERVED_TEXT_FORMAT = "<|reserved_text_{i}|>"
BYTE_BOS, BYTE_EOS = "<|begin_of_text|>", "<|end_of_text|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def audio_token(k: int, x: int) -> str:
    """Name of code ``x`` of codebook ``k``."""
    return AUDIO_TOKEN_FORMAT.format(k=k, x=x)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (what ``pre_tokenizers.ByteLevel`` emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def byte_level_text_tokenizer():
    """A ``tokenizers.Tokenizer`` equal to :class:`soda_mega.data.tokenizer.ByteTokenizer`.

    A BPE model without merges over the 256 byte symbols: the ByteLevel pre-tokenizer turns
    text into its UTF-8 bytes (no regex split, no prefix space), each byte is its own token,
    and the ByteLevel decoder joins bytes back into UTF-8 (invalid sequences become U+FFFD,
    as in ``ByteTokenizer.decode``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _add(tok, names: list[str], first_id: int, what: str) -> None:
    """Append ``names`` as special added tokens and check they land at ``first_id``..."""
    from tokenizers import AddedToken

    clash = [n for n in names if tok.token_to_id(n) is not None]
    if clash:
        raise HFError(f"text tokenizer already has a token {clash[0]!r} (id {tok.token_to_id(clash[0])}); "
                      f"it cannot also be the {what} id {first_id + names.index(clash[0])}")
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    for offset in (0, len(names) - 1):
        got = tok.token_to_id(names[offset])
        if got != first_id + offset:
            raise HFError(f"{what} token {names[offset]!r} landed at id {got}, expected "
                          f"{first_id + offset}; the text tokenizer's ids are not contiguous")


def _text_range_names(layout: VocabLayout, first: int) -> list[str]:
    """Names of text ids ``first .. T-1`` that the text tokenizer itself does not define."""
    names = []
    for i in range(first, layout.text_vocab_size):
        names.append(BYTE_BOS if i == layout.bos_id else BYTE_EOS if i == layout.eos_id
                     else RESERVED_TEXT_FORMAT.format(i=i))
    return names


def build_tokenizer(layout: VocabLayout, text_tokenizer: str | Path | None):
    """(full-vocabulary ``tokenizers.Tokenizer``, record of the text tokenizer used)."""
    from tokenizers import Tokenizer

    if text_tokenizer is None:
        if layout.bos_id < 256 or layout.eos_id < 256:
            raise HFError(f"the run used the byte-level tokenizer, whose ids 0..255 are bytes, but "
                          f"vocab.bos_id={layout.bos_id} / vocab.eos_id={layout.eos_id} fall among them; "
                          "give the run's text tokenizer with --tokenizer PATH")
        tok = byte_level_text_tokenizer()
        info = {"kind": "byte", "source": None}
        own = 256
    else:
        path = Path(text_tokenizer)
        if not path.is_file():
            raise HFError(f"text tokenizer {path}: no such file (the checkpoint's data.tokenizer); "
                          "pass the run's tokenizer.json with --tokenizer PATH")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exception subclasses
            raise HFError(f"text tokenizer {path}: not a HuggingFace tokenizer.json ({err})") from None
        own = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        if own > layout.text_vocab_size:
            raise HFError(f"text tokenizer {path}: its ids reach {own - 1}, beyond the checkpoint's "
                          f"text range [0, {layout.text_vocab_size}) (vocab.text_vocab_size)")
        info = {"kind": "hf", "source": str(path.resolve()), "sha256": file_sha256(path)}
    fill = _text_range_names(layout, own)
    if fill:
        _add(tok, fill, own, "text")
    _add(tok, list(layout.special_tokens), layout.special_base, "special")
    audio = [audio_token(k, x) for k in range(layout.num_codebooks) for x in range(layout.codebook_size)]
    _add(tok, audio, layout.audio_base, "audio")
    if tok.get_vocab_size(with_added_tokens=True) != layout.size:
        raise HFError(f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids, the "
                      f"vocabulary layout {layout.size}")
    _start_with_bos(tok, layout)
    return tok, info


def _start_with_bos(tok, layout: VocabLayout) -> None:
    """Make ``tok(text)`` start with BOS, as every training document does
    (:mod:`soda_mega.data.documents`); a text tokenizer whose post-processor adds it already
    (Llama 3's) is left as it is. ``add_special_tokens=False`` still encodes the text alone."""
    from tokenizers import processors

    if tok.encode("a").ids[:1] == [layout.bos_id]:
        return
    bos = tok.id_to_token(layout.bos_id)
    bos_first = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                              special_tokens=[(bos, layout.bos_id)])
    # NOTE: a post-processor of the text tokenizer (ByteLevel offsets, say) keeps its work.
    tok.post_processor = (bos_first if tok.post_processor is None
                          else processors.Sequence([tok.post_processor, bos_first]))


def write_tokenizer_files(folder: Path, tok, layout: VocabLayout, max_length: int) -> list[str]:
    """``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` for AutoTokenizer."""
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    bos, eos = tok.id_to_token(layout.bos_id), tok.id_to_token(layout.eos_id)
    # EOS pads, as generation_config.json's pad_token_id says: `tok([...], padding=True)`.
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": eos,
                "additional_special_tokens": list(layout.special_tokens)}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        # NOTE: on the left, so that a batch of prompts generates as each prompt alone (the
        # model takes positions from the attention mask); right-padded prompts would continue
        # after their padding.
        "padding_side": "left",
        # Qwen3's forward takes no token_type_ids: `model.generate(**tok(s, return_tensors="pt"))`
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_length,
        # NOTE: no clean-up: "a ." -> "a." would change text that round-trips exactly otherwise.
        "clean_up_tokenization_spaces": False,
        "audio_token_format": AUDIO_TOKEN_FORMAT,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return list(TOKENIZER_FILES)


def _load(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exception subclasses
        raise HFError(f"{path}: not a HuggingFace tokenizer.json ({err})") from None


def layout_from_tokenizer(path: Path, bos_id: int | None, eos_id: int | None,
                          vocab_size: int) -> tuple[VocabLayout | None, str]:
    """The layout a full-vocabulary ``tokenizer.json`` implies, or (None, why not).

    The text range ends at the first SODA special token; the special range runs up to the first
    audio token (``<|audio_0_0|>``); codebooks are counted from the ``<|audio_k_x|>`` names.
    Without audio names, the special range is the four SODA tokens and the codebooks are SODA's
    8 x 2048 when ``vocab_size`` holds them.
    """
    tok = _load(path)
    ids = {name: tok.token_to_id(name) for name in SODA_SPECIAL_TOKENS}
    missing = [n for n, i in ids.items() if i is None]
    if missing:
        return None, f"{path.name} has no {', '.join(missing)}"
    text_size = min(ids.values())
    audio_base = tok.token_to_id(audio_token(0, 0))
    if audio_base is not None:
        size = 0
        while tok.id_to_token(audio_base + size) == audio_token(0, size):
            size += 1
        books = 0
        while tok.token_to_id(audio_token(books, 0)) == audio_base + books * size:
            books += 1
        how = f"special and <|audio_k_x|> tokens of {path.name}"
    else:
        audio_base = max(ids.values()) + 1
        size, books = 2048, 8
        how = f"special tokens of {path.name}, SODA's 8 x 2048 codebooks"
        if audio_base + books * size > vocab_size:
            return None, f"{path.name} names no audio tokens and vocab_size {vocab_size} cannot hold 8 x 2048"
    specials = [tok.id_to_token(i) for i in range(text_size, audio_base)]
    if None in specials:
        return None, f"{path.name} has unnamed ids between {text_size} and {audio_base}"
    if bos_id is None or eos_id is None:
        return None, "config.json names no bos_token_id / eos_token_id"
    try:
        layout = VocabLayout(text_vocab_size=text_size, special_tokens=tuple(specials),
                             num_codebooks=books, codebook_size=size, bos_id=bos_id, eos_id=eos_id)
    except ValueError as err:
        return None, f"{path.name} implies an invalid layout ({err})"
    return layout, how


def text_part(path: Path, layout: VocabLayout) -> str:
    """The text range ``[0, T)`` of the full tokenizer at ``path``, as ``tokenizer.json`` text.

    soda-mega's data pipeline places special and audio ids itself and checks that the text
    tokenizer's ids stay below ``vocab.text_vocab_size``, so ``data.tokenizer`` must name a
    tokenizer without the added special and audio tokens.
    """
    from tokenizers import Tokenizer

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data["added_tokens"] = [t for t in data.get("added_tokens", [])
                                if t["id"] < layout.text_vocab_size]
        text = json.dumps(data, ensure_ascii=False)
        tok = Tokenizer.from_str(text)
    except Exception as err:  # noqa: BLE001 - JSON, schema and Rust-side errors alike
        raise HFError(f"{path}: not a HuggingFace tokenizer.json ({err})") from None
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= layout.text_vocab_size:
        raise HFError(f"{path}: its text model has ids up to {top}, beyond the text range "
                      f"[0, {layout.text_vocab_size})")
    return text
