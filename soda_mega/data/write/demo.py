"""The embedded demo corpus: espeak-ng speech of shipped sentences + a shipped text corpus.

``soda-mega data demo OUT`` builds, with the ``tiny`` preset's vocabulary by default:

* ``OUT/sources/``: one WAV per recording (three consecutive sentences of
  ``demo_assets/sentences.txt`` spoken by one espeak-ng voice, 0.35 s apart; voices and
  speeds rotate over :data:`VOICES`) and ``manifest.jsonl`` with the sentence timings as
  segments. Synthesis is cached: a rerun reuses the WAVs.
* ``OUT/speech/``: the speech dataset (audio-first and text-first documents), Mimi codes
  (random init unless ``--mimi-weights``).
* ``OUT/text/``: the text dataset from ``demo_assets/text_corpus.txt`` (one document per
  paragraph).

Without espeak-ng (``scripts/bootstrap.sh`` installs it where it can) the speech dataset is
built from ``demo_assets/fallback/``: four short 16 kHz WAV recordings made with
:func:`write_fallback_assets`, and a notice says so. The sentences and the text corpus were
written for this project.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from soda_mega.config import load_config
from soda_mega.config.schema import SodaConfig
from soda_mega.data.resample import resample
from soda_mega.data.write.builder import BuildResult, build_dataset
from soda_mega.data.write.writer import atomic_write_text

ASSETS = Path(__file__).resolve().parent / "demo_assets"
SENTENCES = ASSETS / "sentences.txt"
TEXT_CORPUS = ASSETS / "text_corpus.txt"
FALLBACK = ASSETS / "fallback"

# (espeak-ng voice, words per minute): accents, male/female variants and speeds for variety.
VOICES = (("en-us", 165), ("en-gb", 150), ("en-us+f3", 175), ("en-gb-scotland", 160),
          ("en-029", 155), ("en-gb-x-rp+f2", 170), ("en-us+m3", 140), ("en-gb+f4", 180))
SENTENCES_PER_RECORDING = 3
PAUSE_SECONDS = 0.35

#: Config overrides the demo applies before the user's own (which win).
DEMO_OVERRIDES = ("--data.valid_fraction=0.1", "--data.build_unit_recordings=8")


def demo_config(config: str | None = None, preset: str | None = None,
                overrides: Sequence[str] = ()) -> SodaConfig:
    """The demo's configuration: ``tiny`` unless a config/preset is given, plus the demo overrides."""
    if preset is None and config is None:
        preset = "tiny"
    return load_config(config, preset, [*DEMO_OVERRIDES, *overrides])


def read_sentences(path: Path = SENTENCES, limit: int | None = None) -> list[str]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    sentences = [ln for ln in lines if ln and not ln.startswith("#")]
    return sentences[:limit] if limit else sentences


def espeak_binary() -> str | None:
    return shutil.which("espeak-ng")


def _speak(binary: str, text: str, voice: str, speed: int) -> tuple[np.ndarray, int]:
    """int16 mono samples and rate of ``text`` spoken by espeak-ng (stdin in, WAV on stdout)."""
    proc = subprocess.run([binary, "-v", voice, "-s", str(speed), "--stdout"], input=text.encode("utf-8"),
                          capture_output=True, check=False, timeout=120)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice}: {proc.stderr.decode(errors='replace')}")
    return _parse_wav_bytes(proc.stdout)


def _parse_wav_bytes(blob: bytes) -> tuple[np.ndarray, int]:
    # NOTE: espeak-ng streams to stdout without knowing the length, so the RIFF size fields are
    # placeholders; find the "data" chunk and read everything after it.
    fmt = blob.index(b"fmt ")
    channels = int.from_bytes(blob[fmt + 10:fmt + 12], "little")
    rate = int.from_bytes(blob[fmt + 12:fmt + 16], "little")
    bits = int.from_bytes(blob[fmt + 22:fmt + 24], "little")
    if channels != 1 or bits != 16:
        raise RuntimeError(f"unexpected espeak-ng output: {channels} channels, {bits} bits")
    data = blob.index(b"data") + 8
    pcm = np.frombuffer(blob[data:len(blob) - (len(blob) - data) % 2], dtype="<i2")
    return pcm.copy(), rate


def _write_wav(path: Path, pcm: np.ndarray, rate: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with wave.open(str(tmp), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.astype("<i2").tobytes())
    tmp.replace(path)


def _trim(pcm: np.ndarray, threshold: int = 64) -> np.ndarray:
    """Drop leading/trailing near-silence that espeak-ng adds around each sentence."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > threshold)
    return pcm[loud[0]:loud[-1] + 1] if loud.size else pcm


def _recording(binary: str, sentences: Sequence[str], voice: str, speed: int,
               rate_out: int | None = None) -> tuple[np.ndarray, int, list[dict]]:
    """Sentences spoken one after the other: (int16 samples, rate, segments)."""
    pieces, segments, pos, rate = [], [], 0, 0
    for text in sentences:
        pcm, rate = _speak(binary, text, voice, speed)
        pcm = _trim(pcm)
        if rate_out and rate_out != rate:
            wav = resample(torch.from_numpy(pcm.astype(np.float32) / 32768.0), rate, rate_out).numpy()
            pcm = np.clip(np.round(wav * 32768.0), -32768, 32767).astype(np.int16)
        r = rate_out or rate
        gap = np.zeros(int(PAUSE_SECONDS * r), np.int16)
        segments.append({"start": round((pos + gap.size) / r, 4),
                         "end": round((pos + gap.size + pcm.size) / r, 4), "text": text})
        pieces += [gap, pcm]
        pos += gap.size + pcm.size
    pieces.append(np.zeros(int(PAUSE_SECONDS * (rate_out or rate)), np.int16))
    return np.concatenate(pieces), rate_out or rate, segments


def synthesize(out_dir: Path, sentences: Sequence[str], jobs: int = 2, quiet: bool = False) -> Path:
    """WAVs + ``manifest.jsonl`` for ``sentences`` in ``out_dir`` (cached per recording)."""
    binary = espeak_binary()
    if binary is None:
        raise RuntimeError("espeak-ng is not installed")
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = [sentences[i:i + SENTENCES_PER_RECORDING]
              for i in range(0, len(sentences), SENTENCES_PER_RECORDING)]

    def one(j: int) -> dict:
        voice, speed = VOICES[j % len(VOICES)]
        wav, meta = out_dir / f"rec_{j:04d}.wav", out_dir / f"rec_{j:04d}.json"
        key = {"voice": voice, "speed": speed, "sentences": list(groups[j]), "pause": PAUSE_SECONDS}
        if wav.is_file() and meta.is_file():
            cached = json.loads(meta.read_text())
            if cached.get("key") == key:
                return cached["record"]
        pcm, rate, segments = _recording(binary, groups[j], voice, speed)
        _write_wav(wav, pcm, rate)
        record = {"id": f"demo/{j:04d}", "audio": wav.name, "segments": segments,
                  "voice": voice, "speed": speed}
        atomic_write_text(meta, json.dumps({"key": key, "record": record}))
        return record

    if not quiet:
        print(f"[soda-mega data demo] synthesising {len(sentences)} sentences in {len(groups)} recordings "
              f"with espeak-ng ({binary})", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        records = list(pool.map(one, range(len(groups))))
    manifest = out_dir / "manifest.jsonl"
    atomic_write_text(manifest, "".join(json.dumps(r) + "\n" for r in records))
    return manifest


def write_fallback_assets(out_dir: Path = FALLBACK, sentences: Sequence[str] | None = None,
                          recordings: int = 4, rate: int = 16_000) -> Path:
    """Regenerate the shipped fallback WAVs (16 kHz mono 16-bit) and their manifest."""
    binary = espeak_binary()
    if binary is None:
        raise RuntimeError("espeak-ng is needed to regenerate the fallback assets")
    sentences = list(sentences or read_sentences())
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for j in range(recordings):
        group = sentences[j * SENTENCES_PER_RECORDING:(j + 1) * SENTENCES_PER_RECORDING]
        voice, speed = VOICES[j % len(VOICES)]
        pcm, r, segments = _recording(binary, group, voice, speed, rate_out=rate)
        _write_wav(out_dir / f"fallback_{j}.wav", pcm, r)
        lines.append(json.dumps({"id": f"demo-fallback/{j}", "audio": f"fallback_{j}.wav",
                                 "segments": segments}))
    (out_dir / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out_dir / "manifest.jsonl"


def fallback_manifest(out_dir: Path, limit: int | None = None) -> Path:
    """The shipped fallback manifest, or a copy with the recordings of the first ``limit``
    sentences (audio paths made absolute) in ``out_dir``."""
    if not limit:
        return FALLBACK / "manifest.jsonl"
    keep = -(-limit // SENTENCES_PER_RECORDING)
    records = [json.loads(line) for line in (FALLBACK / "manifest.jsonl").read_text().splitlines()[:keep]]
    for r in records:
        # NOTE: a recording is split by its audio path as written when it names no
        # recording_id; the absolute path below would make the split depend on where
        # soda-mega is installed. The name as the shipped manifest writes it keeps the split
        # of the full demo.
        r.setdefault("recording_id", r["audio"])
        r["audio"] = str(FALLBACK / r["audio"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fallback_manifest.jsonl"
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def build_demo(out: str | Path, cfg: SodaConfig, *, overwrite: bool = False, limit: int | None = None,
               use_espeak: bool = True, show_progress: bool = True,
               workers: int | None = None) -> list[BuildResult]:
    """Build ``OUT/speech`` and ``OUT/text`` (see the module docstring)."""
    out = Path(out)
    if use_espeak and espeak_binary():
        manifest = synthesize(out / "sources", read_sentences(limit=limit),
                              jobs=max(1, cfg.data.build_workers), quiet=not show_progress)
    else:
        reason = "--no-espeak was given" if not use_espeak else "espeak-ng is not installed"
        print(f"[soda-mega data demo] NOTE: {reason}; building the speech demo from the "
              f"{len(list(FALLBACK.glob('*.wav')))} WAV files shipped in {FALLBACK} instead "
              "(install espeak-ng, e.g. `apt-get install espeak-ng`, for the full corpus)",
              file=sys.stderr)
        manifest = fallback_manifest(out / "sources", limit)
    speech = build_dataset(out / "speech", [manifest], "speech", cfg, overwrite=overwrite,
                           workers=workers, show_progress=show_progress)
    text = build_dataset(out / "text", [TEXT_CORPUS], "text", cfg, overwrite=overwrite,
                         workers=workers, show_progress=show_progress)
    return [speech, text]


if __name__ == "__main__":
    # Maintainers: `python -m soda_mega.data.write.demo --write-fallback` regenerates demo_assets/fallback.
    if sys.argv[1:] == ["--write-fallback"]:
        print(write_fallback_assets())
    else:
        sys.exit("usage: python -m soda_mega.data.write.demo --write-fallback  (users: soda-mega data demo OUT)")
