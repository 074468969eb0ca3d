"""Byte-level fallback and HuggingFace tokenizer.json, and their fit to the vocabulary layout."""

from __future__ import annotations

import pytest

from soda_mega.config.fields import ConfigError
from soda_mega.data.tokenizer import ByteTokenizer, HFTokenizer, check_fits, load_tokenizer
from soda_mega.tokens.layout import VocabLayout

TINY = VocabLayout(text_vocab_size=258, bos_id=256, eos_id=257)


def test_byte_round_trip():
    tok = ByteTokenizer()
    text = "Grüße, 東京! \n tab\t"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256 and len(ids) > len(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 256 and tok.metadata()["kind"] == "byte"
    with pytest.raises(UnicodeEncodeError):
        tok.encode("\ud800")  # lone surrogate: reported as a bad record by the builder


def test_byte_fallback_is_announced(capsys):
    tok = load_tokenizer(None, TINY)
    assert isinstance(tok, ByteTokenizer)
    assert "byte-level tokenizer" in capsys.readouterr().err


def test_byte_tokenizer_needs_boundaries_outside_the_bytes():
    with pytest.raises(ConfigError, match="vocab.bos_id"):
        check_fits(ByteTokenizer(), VocabLayout(text_vocab_size=258, bos_id=1, eos_id=257))
    warnings = check_fits(ByteTokenizer(), VocabLayout.soda_default())
    assert any("unused" in w for w in warnings)


@pytest.fixture
def hf_path(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, ",": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer(hf_path):
    layout = VocabLayout(text_vocab_size=6, bos_id=1, eos_id=2)
    tok = load_tokenizer(hf_path, layout, announce=False)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 6
    assert tok.encode("hello , world") == [3, 5, 4]  # no BOS/EOS added
    assert tok.encode("hello mars") == [3, 0]
    assert tok.decode([3, 4]) == "hello world"
    assert tok.boundary_ids() == (1, 2)
    meta = tok.metadata()
    assert meta["kind"] == "hf" and len(meta["sha256"]) == 64 and meta["path"].endswith("tokenizer.json")


def test_hf_tokenizer_too_big_for_the_layout(hf_path):
    with pytest.raises(ConfigError, match=r"vocab.text_vocab_size: 4 .*--vocab.text_vocab_size=6 "
                                          r"--vocab.bos_id=1 --vocab.eos_id=2"):
        load_tokenizer(hf_path, VocabLayout(text_vocab_size=4, bos_id=1, eos_id=2))


def test_hf_boundary_mismatch_warns(hf_path, capsys):
    load_tokenizer(hf_path, VocabLayout(text_vocab_size=6, bos_id=3, eos_id=2))
    err = capsys.readouterr().err
    assert "--vocab.bos_id=1" in err and "'<s>'" in err


def test_hf_tokenizer_missing_or_broken(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        HFTokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a HuggingFace tokenizer.json"):
        HFTokenizer(tmp_path / "bad.json")
