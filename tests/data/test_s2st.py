"""Speech-to-speech translation data: the ``s2st`` document and mask, the build, the loader."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from build_helpers import random_codes, read_split, tiny_config, tone, wav_bytes, write_manifest
from soda_mega.cli import main
from soda_mega.data.documents import audio_ids, s2st
from soda_mega.data.read.loader import SodaDataLoader
from soda_mega.data.read.source import DocumentSource
from soda_mega.data.schema import LENGTHS_FILE, META_FILE, META_KEYS, SPLITS
from soda_mega.data.write.builder import build_dataset, split_of
from soda_mega.tokens.layout import VocabLayout

# text 0..9 (BOS 8, EOS 9); <|text_start|> 10, <|text_end|> 11, <|audio_start|> 12,
# <|audio_end|> 13; codebook 0: 14..17, codebook 1: 18..21 (as in test_documents.py).
SMALL = VocabLayout(text_vocab_size=10, num_codebooks=2, codebook_size=4, bos_id=8, eos_id=9)


def test_document_token_by_token_and_mask():
    source = np.array([[0, 1], [3, 2]])      # frames (14, 21) (15, 20)
    target = np.array([[2, 3, 0], [1, 0, 3]])  # frames (16, 19) (17, 18) (14, 21)
    tokens, mask = s2st(SMALL, source, [1, 2], [5], target)
    assert tokens.tolist() == [8,                      # BOS
                               12, 14, 21, 15, 20, 13,  # source audio
                               10, 1, 2, 11,            # source text
                               10, 5, 11,               # target text
                               12, 16, 19, 17, 18, 14, 21, 13,  # target audio
                               9]                       # EOS
    assert mask.tolist() == [0] * 11 + [1] * 12
    assert tokens.dtype == np.int32 and mask.dtype == np.uint8


def test_document_needs_both_texts():
    codes = np.zeros((2, 1), np.int64)
    with pytest.raises(ValueError, match="non-empty source and target text"):
        s2st(SMALL, codes, [], [1], codes)


def _target_start(tokens: np.ndarray, layout: VocabLayout) -> int:
    """Index of the target's <|text_start|>: the second one of the document (audio ids and text
    ids never equal a special id)."""
    return int(np.flatnonzero(tokens == layout.text_start)[1])


def _rule_mask(tokens: np.ndarray, layout: VocabLayout) -> np.ndarray:
    mask = np.zeros(len(tokens), np.uint8)
    mask[_target_start(tokens, layout):] = 1
    return mask


def _wav(path: Path, seconds: float, rate: int, freq: float) -> None:
    path.write_bytes(wav_bytes((tone(seconds, rate, freq) * 32767).astype("<i2"), rate))


def _codes_pairs(tmp: Path, n: int, seed: int = 0) -> list[dict]:
    """``n`` pairs given as .npy codes (source 6+i frames, target 9+i frames)."""
    tmp.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        np.save(tmp / f"s{i}.npy", random_codes(seed + 2 * i, 6 + i))
        np.save(tmp / f"t{i}.npy", random_codes(seed + 2 * i + 1, 9 + i))
        records.append({"id": f"pair{i}", "source_codes": f"s{i}.npy", "source_text": f"source {i}",
                        "target_text": f"cible {i}", "target_codes": f"t{i}.npy"})
    return records


def test_build_from_wavs_and_codes_with_bad_records(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _wav(src / "en0.wav", 0.5, 16000, 220.0)
    _wav(src / "fr0.wav", 0.7, 24000, 330.0)
    _wav(src / "en1.wav", 0.4, 22050, 440.0)
    (src / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    np.save(src / "k4.npy", random_codes(9, 5, k=4))
    records = _codes_pairs(src, 3) + [
        {"id": "wav0", "source_audio": "en0.wav", "source_text": "Good morning.",
         "target_text": "Bonjour.", "target_audio": "fr0.wav"},
        {"id": "mixed", "source_audio": "en1.wav", "source_text": "Thanks.",
         "target_text": "Merci.", "target_codes": "t0.npy"},
        {"id": "gone", "source_audio": "missing.wav", "source_text": "a", "target_text": "b",
         "target_audio": "fr0.wav"},
        {"id": "undecodable", "source_audio": "en0.wav", "source_text": "a", "target_text": "b",
         "target_audio": "broken.wav"},
        {"id": "blank", "source_audio": "en0.wav", "source_text": "a", "target_text": "  ",
         "target_audio": "fr0.wav"},
        {"id": "fewbooks", "source_codes": "k4.npy", "source_text": "a", "target_text": "b",
         "target_codes": "t1.npy"},
        {"id": "both", "source_audio": "en0.wav", "source_codes": "s0.npy", "source_text": "a",
         "target_text": "b", "target_audio": "fr0.wav"},
        {"id": "pair0", "source_codes": "s1.npy", "source_text": "a", "target_text": "b",
         "target_codes": "t1.npy"},
        "{not json",
    ]
    manifest = write_manifest(src / "pairs.jsonl", records)
    out = tmp_path / "out"
    cfg = tiny_config("--data.valid_fraction=0.4")
    layout = VocabLayout.from_config(cfg.vocab)
    result = build_dataset(out, [manifest], "s2st", cfg, show_progress=False)

    docs, skipped = {}, []
    # a pair goes to the split of its source recording (its source file as written)
    source: dict[str, str] = {}
    for r in records:  # the first line of an id is the one built (a repeated id is skipped)
        if isinstance(r, dict):
            source.setdefault(r["id"], r.get("source_audio") or r.get("source_codes"))
    for split in SPLITS:
        meta = json.loads((out / split / META_FILE).read_text())
        assert set(META_KEYS) <= set(meta)
        assert meta["kind"] == "s2st" and meta["split"] == split
        assert meta["codec"]["name"] == "mimi" and meta["codec"]["random_init"] is True
        samples = read_split(out / split)
        assert np.load(out / split / LENGTHS_FILE).tolist() == [len(s["tokens"]) for s in samples]
        assert meta["num_docs"] == len(samples)
        assert meta["doc_types"] == ({"s2st": len(samples)} if samples else {})
        for s in samples:
            assert s["doc_type"] == "s2st" and split_of(source[s["record_id"]], 0.4) == split
            docs[s["record_id"]] = s
        skipped += meta["skipped"]
    assert sorted(docs) == ["mixed", "pair0", "pair1", "pair2", "wav0"]
    assert {split_of(source[r], 0.4) for r in docs} == {"train", "valid"}

    # Lines rejected while reading the manifest are named by line, the others by id and line.
    expected = {"gone (pairs.jsonl:6)": "source: audio file not found",
                "undecodable (pairs.jsonl:7)": "target: cannot decode audio",
                "pairs.jsonl:8": "'target_text' must be a non-empty string",
                "fewbooks (pairs.jsonl:9)": "source: codes k4.npy have 4 codebooks",
                "pairs.jsonl:10": "exactly one of 'source_audio'",
                "pair0 (pairs.jsonl:11)": "duplicate record id", "pairs.jsonl:12": "not valid JSON"}
    assert len(skipped) == len(expected) == len(result.skipped)
    for record, reason in expected.items():
        assert sum(s["record"] == record and reason in s["reason"] for s in skipped) == 1, \
            (record, reason, skipped)

    text = lambda s: [*s.encode()]  # the tiny preset's byte tokenizer  # noqa: E731
    for i in range(3):
        want_tokens, want_mask = s2st(layout, np.load(src / f"s{i}.npy"), text(f"source {i}"),
                                      text(f"cible {i}"), np.load(src / f"t{i}.npy"))
        assert docs[f"pair{i}"]["tokens"].tolist() == want_tokens.tolist()
        assert docs[f"pair{i}"]["loss_mask"].tolist() == want_mask.tolist()

    # The WAVs went through the same codec path as a speech build: the same audio ids.
    speech = write_manifest(src / "speech.jsonl", [{"id": n, "audio": f"{n}.wav"} for n in ("en0", "fr0", "en1")])
    build_dataset(tmp_path / "speech", [speech], "speech",
                  tiny_config("--data.valid_fraction=0", "--data.doc_types=[speech_only]"), show_progress=False)
    spans = {s["record_id"]: s["tokens"][2:-2] for s in read_split(tmp_path / "speech" / "train")}
    assert {k: len(v) for k, v in spans.items()} == {"en0": 8 * 7, "fr0": 8 * 9, "en1": 8 * 5}  # ceil(s * 12.5)
    want_tokens, want_mask = s2st(layout, _codes_of(layout, spans["en0"]), text("Good morning."),
                                  text("Bonjour."), _codes_of(layout, spans["fr0"]))
    assert docs["wav0"]["tokens"].tolist() == want_tokens.tolist()
    assert docs["wav0"]["loss_mask"].tolist() == want_mask.tolist()
    mixed = docs["mixed"]["tokens"]
    assert mixed[2:2 + len(spans["en1"])].tolist() == spans["en1"].tolist()
    t0 = np.load(src / "t0.npy")
    assert mixed[-2 - 8 * t0.shape[1]:-2].tolist() == audio_ids(layout, t0).tolist()

    seconds = 0.5 + 0.7 + 0.4 + sum((6 + i + 9 + i) / 12.5 for i in range(3)) + 9 / 12.5
    hours = sum(json.loads((out / s / META_FILE).read_text())["audio_hours"] for s in SPLITS)
    assert hours == pytest.approx(seconds / 3600)


def _codes_of(layout: VocabLayout, ids: np.ndarray) -> np.ndarray:
    return layout.ids_to_codes(torch.from_numpy(np.asarray(ids, np.int64))).numpy()


def test_cli_builds_an_s2st_dataset(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "pairs.jsonl", _codes_pairs(tmp_path, 4))
    rc = main(["data", "build", "--s2st", str(manifest), str(tmp_path / "out"), "--preset", "tiny",
               "--workers", "0", "--quiet", "--data.valid_fraction=0"])
    assert rc == 0
    assert "built s2st dataset" in capsys.readouterr().out
    assert DocumentSource(tmp_path / "out", "train").kind == "s2st"
    assert "--s2st FILE" in _help(capsys)


def _help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["data", "build", "--help"])
    return capsys.readouterr().out


def test_loader_masks_exactly_the_source_part(tmp_path):
    """Labels are the tokens shifted by one and so is the mask: a label counts exactly when it
    is a token of a target part (from the target's <|text_start|> to EOS)."""
    manifest = write_manifest(tmp_path / "pairs.jsonl", _codes_pairs(tmp_path, 8, seed=5))
    out = tmp_path / "out"
    build_dataset(out, [manifest], "s2st", tiny_config("--data.valid_fraction=0"), show_progress=False)
    cfg = tiny_config(f"--data.train={out}", "--model.seq_length=96", "--training.micro_batch_size=2",
                      "--training.global_batch_size=4", "--data.num_workers=0")
    layout = VocabLayout.from_config(cfg.vocab)
    loader = SodaDataLoader(cfg, "train", dp_rank=0, dp_size=1, needs_data=True)
    source = loader.sources[0]
    windows = itertools.count()  # the windows the loader will read, in order (DP = 1)
    mixed_rows = 0
    for batch in itertools.islice(iter(loader), 12):
        for row in range(batch["tokens"].shape[0]):
            pieces = loader.plan.window(next(windows))
            window = np.concatenate([source.get(d)[0][a:b] for _, d, a, b in pieces])
            want = np.concatenate([_rule_mask(source.get(d)[0], layout)[a:b] for _, d, a, b in pieces])
            assert batch["tokens"][row].tolist() == window[:-1].tolist()
            assert batch["labels"][row].tolist() == window[1:].tolist()
            got = batch["loss_mask"][row].numpy()
            assert got.tolist() == want[1:].astype(np.float32).tolist()
            mixed_rows += bool(got.min() == 0 and got.max() == 1)
    assert mixed_rows > 0  # windows really hold both parts
