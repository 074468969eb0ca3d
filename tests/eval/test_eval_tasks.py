"""Likelihood pairs, ASR, TTS and the task builder: protocol details, scores against direct
computations, reports, and bad inputs. Audio comes from the WAVs shipped with the demo corpus."""

from __future__ import annotations

import json
import math
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_helpers import make_tiny_checkpoint
from soda_mega.cli import main as cli
from soda_mega.eval import prompts
from soda_mega.eval.pairs import mean_audio_logprobs, wilson_interval
from soda_mega.eval.wer import normalize, word_error_rate
from soda_mega.inference.decoder import SodaDecoder
from soda_mega.tokens.layout import VocabLayout

FALLBACK = Path(__file__).resolve().parents[2] / "soda_mega" / "data" / "write" / "demo_assets" / "fallback"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), 2)


@pytest.fixture(scope="module")
def decoder(checkpoint):
    return SodaDecoder.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from soda_mega.eval.task_builder import build_tasks

    out = tmp_path_factory.mktemp("tasks")
    built = build_tasks(FALLBACK / "manifest.jsonl", out, split="all", limit=6, pair_seconds=0.6)
    return built


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16)


# ------------------------------------------------------------------------------ protocol
def test_prompts_follow_the_spec_token_by_token():
    lay = VocabLayout.soda_default()
    a, b, t, u = [lay.audio_base + 1, lay.audio_base + 2049], [lay.audio_base + 5], [10, 11], [12]
    S, E, TS, TE, AS, AE = lay.bos_id, lay.eos_id, lay.text_start, lay.text_end, lay.audio_start, lay.audio_end
    seq, target = prompts.likelihood_item(lay, a)
    assert seq == [S, AS, *a, AE] and target == slice(1, 3)
    assert prompts.asr_prompt(lay, [(a, t)], b) == [S, AS, *a, AE, TS, *t, TE, AS, *b, AE, TS]
    assert prompts.tts_prompt(lay, t, a, u) == [S, TS, *t, TE, AS, *a, AE, TS, *u, TE, AS]
    assert prompts.s2st_prompt(lay, b) == [S, AS, *b, AE]
    assert E not in prompts.tts_prompt(lay, t, a, u)


def test_wer_normalises_case_and_punctuation_and_is_corpus_level():
    assert normalize("  Hello, WORLD!  It's  \"fine\". ") == "hello world it's fine"
    w = word_error_rate(["The cat sat.", "a b c d"], ["the cat", "a x c d e"])
    # 1 deletion + 1 substitution + 1 insertion over 3 + 4 reference words
    assert (w.deletions, w.substitutions, w.insertions, w.reference_words) == (1, 1, 1, 7)
    assert w.wer == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match="empty after normalisation"):
        word_error_rate(["..."], ["x"])


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_pair_scores_are_the_mean_audio_logprob_in_any_batch(decoder):
    lay = decoder.layout
    gen = torch.Generator().manual_seed(0)
    audios = [lay.codes_to_ids(torch.randint(0, lay.codebook_size, (lay.num_codebooks, n), generator=gen)).tolist()
              for n in (3, 7, 1, 5)]
    got1 = mean_audio_logprobs(decoder, audios, batch_size=1)
    got4 = mean_audio_logprobs(decoder, audios, batch_size=4)
    for audio, s1, s4 in zip(audios, got1, got4):
        seq = [lay.bos_id, lay.audio_start, *audio, lay.audio_end]
        with torch.no_grad():
            logp = torch.log_softmax(decoder(torch.tensor([seq]))[0].double(), -1)
        # audio ids sit at positions 2 .. 2+n-1 and are predicted from positions 1 .. n
        want = float(logp[torch.arange(1, 1 + len(audio)), torch.tensor(audio)].mean())
        assert s1 == pytest.approx(want, abs=1e-4) and s4 == pytest.approx(want, abs=1e-4)


def test_asr_examples_never_leak_the_answer():
    from soda_mega.eval.asr import Utterance, choose_shots, shots_for

    utts = [Utterance(f"u{i}", [], text, "", {}) for i, text in
            enumerate(["one two", "One two!", "three", "four", "five"])]
    pool = choose_shots(utts, 2, seed=0)
    for u in utts:
        shots = shots_for(u.id, u.text, pool, 2)
        assert len(shots) == 2 and u.id not in [s.id for s in shots]
        assert all(normalize(s.text) != normalize(u.text) for s in shots)
    with pytest.raises(ValueError, match="not enough distinct examples"):
        shots_for("u0", "one two", pool, 4)
    with pytest.raises(ValueError, match="at least 6 utterances"):
        choose_shots(utts, 5)


# ------------------------------------------------------------------------------ tasks
def test_task_builder_cuts_segments_and_reverses_pairs(tasks):
    utts = [json.loads(line) for line in tasks.utterances.read_text().splitlines()]
    pairs = [json.loads(line) for line in tasks.pairs.read_text().splitlines()]
    assert len(utts) == len(pairs) == tasks.count == 6
    assert all(u["text"] for u in utts)
    root = tasks.utterances.parent
    for p in pairs:
        pos, neg = _read_wav(root / p["positive"]), _read_wav(root / p["negative"])
        assert len(pos) == int(0.6 * 24000) and np.array_equal(pos[::-1], neg)


def test_pairs_command_end_to_end(checkpoint, tasks, tmp_path, capsys):
    out = tmp_path / "pairs"
    assert cli(["eval", "pairs", str(checkpoint), str(tasks.pairs), "--out", str(out), "--batch-size", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    s = report["summary"]
    assert s["n"] == 6 and s["correct"] == sum(i["correct"] for i in items)
    assert s["accuracy"] == pytest.approx(s["correct"] / 6)
    assert s["ci95"][0] <= s["accuracy"] <= s["ci95"][1]
    assert all(i["positive_logprob"] < 0 and i["negative_logprob"] < 0 for i in items)
    assert "provenance" in report and "| 6 |" in (out / "report.md").read_text()


def test_speech_command_end_to_end(checkpoint, tasks, tmp_path):
    out = tmp_path / "speech"
    assert cli(["eval", "speech", str(checkpoint), str(tasks.utterances), "--out", str(out),
                "--shots", "1", "--asr-max-new-tokens", "12", "--tts-max-new-tokens", "24",
                "--batch-size", "6"]) == 0
    report = json.loads((out / "report.json").read_text())
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    asr = [i for i in items if i["task"] == "asr"]
    tts = [i for i in items if i["task"] == "tts"]
    assert len(asr) == len(tts) == 6
    for item in tts:
        samples = _read_wav(Path(item["wav"]))
        # whole Mimi frames (1920 samples at 24 kHz), every one of them decoded
        assert item["frames"] >= 1 and len(samples) == item["frames"] * 1920
    assert report["summary"]["asr"]["n"] == 6 and report["summary"]["tts"]["n"] == 6
    assert report["summary"]["tts"]["speaker_similarity"] is None
    refs = [i["reference"] for i in asr]
    assert report["summary"]["asr"]["wer"] == pytest.approx(
        word_error_rate(refs, [i["hypothesis"] for i in asr]).wer)


def test_tts_can_be_scored_by_a_plugged_in_transcriber(checkpoint, tasks, tmp_path, monkeypatch):
    plugin = tmp_path / "plug_asr.py"
    plugin.write_text("class Echo:\n    def transcribe(self, paths):\n"
                      "        return ['the same words' for _ in paths]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "tts"
    assert cli(["eval", "tts", str(checkpoint), str(tasks.utterances), "--out", str(out),
                "--asr", "plug_asr:Echo", "--tts-max-new-tokens", "16"]) == 0
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert {i["hypothesis"] for i in items} == {"the same words"}
    sys.modules.pop("plug_asr", None)


def test_bad_inputs_are_named(checkpoint, tasks, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    good = tasks.pairs.read_text().splitlines()[0]
    root = tasks.pairs.parent
    row = json.loads(good)
    row = {k: str(root / v) if k != "id" else v for k, v in row.items()}
    missing = dict(row, id="gone", negative=str(tmp_path / "nope.wav"))
    manifest.write_text(json.dumps(row) + "\n" + json.dumps(missing) + "\n{not json\n")
    assert cli(["eval", "pairs", str(checkpoint), str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "2 bad item(s)" in err and "nope.wav" in err and "not valid JSON" in err
    assert cli(["eval", "pairs", str(checkpoint), str(manifest), "--skip-bad", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["n"] == 1 and report["summary"]["skipped"] == 2
    assert {s["item"] for s in report["skipped_items"]} == {"gone", "line 3"}
    # codes of another vocabulary layout (4 codebooks for an 8-codebook model)
    codes = tmp_path / "k4.npy"
    np.save(codes, np.zeros((4, 5), dtype=np.int64))
    manifest.write_text(json.dumps({"id": "k4", "positive": str(codes), "negative": str(codes)}) + "\n")
    assert cli(["eval", "pairs", str(checkpoint), str(manifest)]) == 2
    assert "k4.npy" in capsys.readouterr().err
    # not a checkpoint
    assert cli(["eval", "pairs", str(tmp_path), str(manifest)]) == 2
    assert "not a soda-mega checkpoint" in capsys.readouterr().err


def test_batched_encoding_equals_one_file_at_a_time(checkpoint, tasks):
    from soda_mega.checkpoint.layout import checkpoint_config
    from soda_mega.data.write.inputs import InputError
    from soda_mega.eval.speech_io import SpeechIO

    speech = SpeechIO(checkpoint_config(checkpoint))
    root = tasks.utterances.parent
    paths = [root / json.loads(line)["audio"] for line in tasks.utterances.read_text().splitlines()[:3]]
    paths.append(root / "missing.wav")
    single = [speech.audio_ids(p) for p in paths[:3]]
    speech.codec.configure(chunk_seconds=10.0, batch_size=3)  # padded batches, as on a GPU
    many = speech.audio_ids_many(paths, chunk=2)
    assert many[:3] == single and len({len(s) for s in single}) > 1
    assert isinstance(many[3], InputError) and "missing.wav" in str(many[3])
