"""Issue 32 item 7 (part): what a dataset's metadata says reaches neither the file system nor the
terminal as-is, and a data error inside a loader worker arrives as one line.

Before the fix ``data inspect`` loaded the tokenizer a dataset's ``soda_meta.json`` names
(``tokenizer.path``: any file of the user's); ESC sequences and newlines in metadata strings
were printed raw (a dataset could recolour the terminal or print a fake line); and a
``DatasetError`` raised in a DataLoader worker reached the user wrapped in torch's ~25-line
"Caught DatasetError in DataLoader worker process 0 / Original Traceback" text.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sec_dataset_helpers import edit_meta, main_in_process, plain_split, tiny_layout

EVIL = "\x1b[2J\x1b[31mPWNED\nsoda-mega: FAKE LINE\r\x07\u202e"


def _hf_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 3, "world": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def _record_tokenizer(split, path: str) -> None:
    def change(meta):
        meta["tokenizer"] = {"kind": "hf", "path": path, "sha256": "0" * 64}
    edit_meta(split, change)


def test_inspect_never_loads_the_tokenizer_a_dataset_names(tmp_path, capsys):
    root = tmp_path / "ds"
    split = plain_split(root / "train", tiny_layout())
    garbage = tmp_path / "not-a-tokenizer.json"
    garbage.write_bytes(b"\x00\xff" * 64)  # the user's file; loading it would fail loudly
    _record_tokenizer(split, str(garbage))
    proc = main_in_process(capsys, "data", "inspect", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not a HuggingFace tokenizer" not in proc.stdout + proc.stderr
    assert "--tokenizer" in proc.stdout  # says how to decode the text


def test_inspect_decodes_with_the_tokenizer_the_user_names(tmp_path, capsys):
    root = tmp_path / "ds"
    split = plain_split(root / "train", tiny_layout())
    tok = _hf_tokenizer(tmp_path / "tokenizer.json")
    _record_tokenizer(split, str(tmp_path / "elsewhere.json"))
    proc = main_in_process(capsys, "data", "inspect", str(root), "--tokenizer", str(tok))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sha256" in proc.stderr and "not the tokenizer" in proc.stderr  # recorded != given


def _poison_meta(meta: dict) -> None:
    meta["doc_types"] = {EVIL: 3}
    meta["tokens"] = {"total": meta["tokens"]["total"], EVIL: 1}
    meta["skipped"] = [{"record": EVIL, "reason": EVIL}]
    meta["vocab_fingerprint"] = EVIL
    meta["kind"] = "speech"
    meta["codec"] = {"name": EVIL, "sample_rate": 24000, "num_codebooks": 8, "codebook_size": 2048,
                     "frame_rate": 12.5, "weights": EVIL, "weights_sha256": EVIL,
                     "random_init": True}
    meta["tokenizer"] = {"kind": EVIL, "path": EVIL, "sha256": EVIL}


def _assert_clean(text: str) -> None:
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text and "\u202e" not in text
    assert not any(line.startswith("soda-mega: FAKE LINE") for line in text.splitlines()), text


def test_metadata_strings_reach_the_terminal_escaped(tmp_path, capsys):
    root = tmp_path / "ds"
    split = plain_split(root / "train", tiny_layout())
    edit_meta(split, _poison_meta)
    proc = main_in_process(capsys, "data", "inspect", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_clean(proc.stdout + proc.stderr)
    assert "PWNED" in proc.stdout and "\\x1b" in proc.stdout  # shown, escaped


def test_errors_quoting_metadata_are_one_escaped_line(tmp_path, capsys):
    root = tmp_path / "ds"
    split = plain_split(root / "train", tiny_layout())
    # Quoted as-is by the layout check's message ("names must be unique, ... appear twice").
    edit_meta(split, lambda meta: meta["vocab_layout"]["special_tokens"].extend([EVIL, EVIL]))
    proc = main_in_process(capsys, "data", "inspect", str(root))
    assert proc.returncode == 2
    _assert_clean(proc.stdout + proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr


def test_a_data_error_in_a_loader_worker_arrives_as_one_line(tmp_path):
    from soda_mega.config import load_config
    from soda_mega.data.read.loader import SodaDataLoader
    from soda_mega.data.shard_contract import DatasetError
    from soda_mega.data.write.synthetic import write_split

    layout = tiny_layout()
    docs = [np.full(40, layout.size + 5, np.int32) for _ in range(4)]  # ids outside the layout
    write_split(tmp_path / "ds" / "train", layout, docs, "text")
    meta_path = tmp_path / "ds" / "train" / "soda_meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta))
    cfg = load_config(preset="tiny", overrides=[f"--data.train={tmp_path / 'ds'}",
                                                "--training.global_batch_size=2",
                                                "--training.micro_batch_size=1"])
    loader = SodaDataLoader(cfg, "train", dp_rank=0, dp_size=1, needs_data=True, num_workers=1)
    with pytest.raises(DatasetError) as err:
        next(iter(loader))
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text and "worker" not in text, text
    assert "outside the vocabulary layout" in text and "shard" in text, text
