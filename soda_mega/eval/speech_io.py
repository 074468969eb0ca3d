"""Audio and text in and out of a checkpoint's token space, for evaluation and inference.

The codec and tokenizer must be the ones the training data was built with: by default they
come from the checkpoint's own configuration (``data.mimi_seed``, ``data.tokenizer``), and
either can be overridden. Mimi weights are the exception: a checkpoint comes from elsewhere, so
the weights file its ``data.mimi_weights`` names is never loaded unasked; the user names it
with ``--mimi-weights`` (a safetensors file, see :mod:`soda_mega.data.codec`). A checkpoint
trained without Mimi weights gets the seeded random Mimi, announced loudly, exactly as the data
builder does (its codes mean nothing, but they are the codes a model trained on the demo corpus
has seen).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from soda_mega.config.fields import ConfigError
from soda_mega.config.schema import SodaConfig
from soda_mega.data.codec import CodecWeightsError, MimiCodec, shared_mimi
from soda_mega.data.tokenizer import load_tokenizer
from soda_mega.data.write.inputs import InputError, load_codes, read_audio
from soda_mega.tokens.layout import VocabLayout


class SpeechIO:
    """Encode audio files and text to ids; decode generated ids to text and waveforms."""

    def __init__(self, cfg: SodaConfig, mimi_weights: str | None = None, tokenizer: str | None = None,
                 device: str = "auto", source: str = "the checkpoint") -> None:
        self.layout = VocabLayout.from_config(cfg.vocab)
        if mimi_weights is None and cfg.data.mimi_weights:
            raise CodecWeightsError(
                f"{source} was trained on audio encoded with the Mimi weights "
                f"{cfg.data.mimi_weights[:300]!r} (its data.mimi_weights); soda-mega never loads a "
                f"file a checkpoint names: pass --mimi-weights PATH (that file, a .safetensors you "
                f"trust)")
        weights = mimi_weights
        self.tokenizer = _tokenizer(tokenizer, cfg.data.tokenizer, self.layout, source)
        self._codec_args = dict(weights=weights, num_codebooks=self.layout.num_codebooks,
                                seed=cfg.data.mimi_seed, device=device)
        self._codec: MimiCodec | None = None
        if weights is None:
            print(f"[soda-mega] NOTE: no Mimi weights (the checkpoint's data.mimi_weights is none): "
                  f"audio is "
                  f"encoded and decoded with the seeded random Mimi (seed {cfg.data.mimi_seed}), as the "
                  "demo corpus was; its audio is not intelligible", file=sys.stderr)

    @property
    def codec(self) -> MimiCodec:
        if self._codec is None:  # built on first use: text-only work never pays for it
            self._codec = shared_mimi(**self._codec_args)
        return self._codec

    # ------------------------------------------------------------------ encode
    def audio_ids(self, path: str | Path) -> list[int]:
        """Frame-major audio ids of a WAV/FLAC/... file or of pre-encoded ``.npy`` codes."""
        return self.audio_ids_many([path], progress=False, strict=True)[0]  # type: ignore[return-value]

    def audio_ids_many(self, paths: Sequence[str | Path], chunk: int = 64, progress: bool = True,
                       strict: bool = False) -> list[list[int] | InputError]:
        """Audio ids of many files, encoded in padded batches (the codec's batch size on GPU),
        ``chunk`` files in memory at a time. A file that cannot be used gives its
        :class:`InputError` in its place, or raises it with ``strict``."""
        results: list[list[int] | InputError | None] = [None] * len(paths)
        for start in range(0, len(paths), chunk):
            wavs, rates, index = [], [], []
            for i in range(start, min(start + chunk, len(paths))):
                path = Path(paths[i])
                try:
                    if path.suffix == ".npy":
                        codes = load_codes(path, self.layout.num_codebooks, self.layout.codebook_size)
                        results[i] = self._ids(path, torch.from_numpy(codes))
                        continue
                    wav, rate = read_audio(path)
                except InputError as err:
                    results[i] = err
                    continue
                wavs.append(wav)
                rates.append(rate)
                index.append(i)
            if wavs:
                for i, codes in zip(index, self.codec.encode_batch(wavs, rates)):
                    results[i] = self._ids(Path(paths[i]), codes)
            if progress and len(paths) > chunk:
                done = min(start + chunk, len(paths))
                print(f"[soda-mega eval] encoded {done}/{len(paths)} recordings", file=sys.stderr, flush=True)
        if strict:
            for result in results:
                if isinstance(result, InputError):
                    raise result
        return results  # type: ignore[return-value]

    def _ids(self, path: Path, codes: torch.Tensor) -> list[int] | InputError:
        if codes.shape[-1] == 0:
            return InputError(f"audio {path.name} is shorter than one codec frame")
        return self.layout.codes_to_ids(codes).tolist()

    def text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    # ------------------------------------------------------------------ decode
    def text(self, ids: Sequence[int]) -> str:
        """Text of the text ids among ``ids`` (markers and audio ids dropped)."""
        lay = self.layout
        keep = [int(i) for i in ids if int(i) < lay.text_vocab_size and int(i) not in (lay.bos_id, lay.eos_id)]
        return self.tokenizer.decode(keep)

    def codes(self, ids: Sequence[int]) -> torch.Tensor:
        """Codes ``[K, T]`` of the audio ids among ``ids`` (whole frames only)."""
        audio = torch.tensor([int(i) for i in ids if int(i) >= self.layout.audio_base], dtype=torch.long)
        k = self.layout.num_codebooks
        return self.layout.ids_to_codes(audio[: len(audio) // k * k], num_codebooks=k)

    def waveform(self, ids: Sequence[int]) -> torch.Tensor:
        """Mono waveform at the codec's rate of the audio ids among ``ids``."""
        codes = self.codes(ids)
        if codes.shape[-1] == 0:
            return torch.zeros(0)
        return self.codec.decode(codes)

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate


def audio_seconds(layout: VocabLayout, ids: Sequence[int], frame_rate: float = 12.5) -> float:
    n = int(np.sum(np.asarray(ids) >= layout.audio_base))
    return n / layout.num_codebooks / frame_rate


def _tokenizer(named: str | None, recorded: str | None, layout: VocabLayout, source: str):
    """The tokenizer the user named, else the one ``source`` recorded (read as data: a missing,
    special or oversized file is refused naming ``--tokenizer``), else the byte-level one."""
    if named or not recorded:
        return load_tokenizer(named, layout, announce=False)
    try:
        return load_tokenizer(recorded, layout, announce=False)
    except ConfigError as err:
        raise ConfigError(f"{source}'s data.tokenizer cannot be used here: {err}; pass "
                          "--tokenizer PATH") from None
