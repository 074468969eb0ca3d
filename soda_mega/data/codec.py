"""Audio codec interface and the Mimi implementation (package ``moshi``), offline only.

:class:`Codec` is what the dataset builder needs from a codec: its rates and code shape,
``encode(wav) -> codes [K, T]`` and ``decode(codes) -> wav``. :class:`MimiCodec` runs Kyutai's
Mimi (24 kHz mono in, 12.5 frames/s, first K of its 32 residual codebooks of 2048 entries).

* Input: ``[S]`` or ``[C, S]`` float audio at any sample rate; channels are averaged (down-mix)
  and the audio is resampled to 24 kHz by :mod:`soda_mega.data.resample` (windowed sinc with
  zero delay, so segment times stay aligned; ``sphn.resample`` shifts audio by ~30 ms).
* Long audio is encoded in Mimi's streaming mode, ``encode_chunk_seconds`` at a time, so the
  encoder's activations stay bounded whatever the length (the transformer keeps a fixed
  250-step context). The result equals one-shot encoding up to float rounding: a code can
  flip where two centroids are nearly equidistant (measured: identical for 2 s chunks,
  2 of 3080 codes different for 10 s chunks of 31 s of speech).
* On GPU, :meth:`MimiCodec.encode_batch` pads several recordings to one length and encodes
  them together. Mimi is causal, so the zero padding after a recording cannot change its
  codes; each result is cut to its own ``ceil(S / 1920)`` frames.
* Weights come from a local safetensors file only (``data.mimi_weights`` / ``--mimi-weights``),
  hashed with SHA-256 and read by :func:`read_mimi_weights` (``safetensors``: tensors only, no
  pickle, so a planted file cannot run code). Nothing is ever downloaded, and moshi's own
  loader (``torch.load`` of anything not named ``.safetensors``) is never given a path:
  ``get_mimi(None)`` builds the model and the tensors are loaded into it here. A path a
  dataset or checkpoint records is only ever compared and printed: the user names the file.
* Without weights Mimi is built from a fixed seed. A freshly initialised Mimi has all-zero
  codebooks (every code would be 0), so :func:`_calibrate_random_codebooks` draws each
  codebook from the statistics of the random encoder's own latents on a fixed synthetic
  signal: codes then vary with the audio, which is what a pipeline or loader test needs, but
  they carry no meaning. :meth:`metadata` records ``random_init: true`` and the builder
  prints a warning, so such shards are never mistaken for real ones.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from soda_mega.data.resample import resample
from soda_mega.errors import SodaUserError

MIMI_SAMPLE_RATE = 24_000
MIMI_FRAME_RATE = 12.5
MIMI_MAX_CODEBOOKS = 32
MIMI_CODEBOOK_SIZE = 2048


class CodecWeightsError(SodaUserError, ValueError):
    """Codec weights that cannot be used: not safetensors, damaged, not Mimi's, or a file that a
    dataset or checkpoint names but the user did not."""


class MissingCodecWeights(CodecWeightsError, FileNotFoundError):
    """The codec weights file named does not exist."""


_SAFETENSORS_ONLY = ("soda-mega reads codec weights only as safetensors (tensors, never a pickle "
                     "such as a torch .pt/.bin/.ckpt, which can run code when loaded); convert a "
                     "file you trust once with safetensors.torch.save_file")


def check_mimi_weights(path: str | Path) -> Path:
    """``path`` when it is a regular file that starts like safetensors (an 8-byte header length
    that fits the file, then a JSON object); anything else is refused, naming it. Reads 9 bytes."""
    import stat

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MissingCodecWeights(f"Mimi weights {str(path)!r} do not exist (data.mimi_weights / "
                                  "--mimi-weights); give a local .safetensors file, nothing is "
                                  "downloaded") from None
    if not stat.S_ISREG(mode):
        raise CodecWeightsError(f"Mimi weights {path}: not a regular file; {_SAFETENSORS_ONLY}")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    header = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if not (2 <= header <= size - 8 and head[8:9] == b"{"):
        raise CodecWeightsError(f"Mimi weights {path}: not a safetensors file (no safetensors "
                                f"header); {_SAFETENSORS_ONLY}")
    return path


def read_mimi_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``; anything else is refused, naming it."""
    from safetensors.torch import load_file

    path = check_mimi_weights(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        text = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CodecWeightsError(f"Mimi weights {path}: damaged safetensors file ({text}); "
                                f"{_SAFETENSORS_ONLY}") from None


class Codec(abc.ABC):
    """A neural audio codec: waveform <-> ``K`` parallel streams of discrete codes per frame."""

    name: str = "codec"

    @property
    @abc.abstractmethod
    def sample_rate(self) -> int:
        """Sample rate (Hz) the model runs at; other rates are resampled on the way in."""

    @property
    @abc.abstractmethod
    def frame_rate(self) -> float:
        """Code frames per second."""

    @property
    @abc.abstractmethod
    def num_codebooks(self) -> int:
        """Codebooks ``K`` returned by :meth:`encode` (codebook 0 first)."""

    @property
    @abc.abstractmethod
    def codebook_size(self) -> int:
        """Entries per codebook: codes lie in ``[0, codebook_size)``."""

    @abc.abstractmethod
    def encode(self, wav: np.ndarray | torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """``[S]`` or ``[C, S]`` float audio (at ``sample_rate``, default :attr:`sample_rate`)
        -> codes, a CPU ``LongTensor [K, T]``."""

    @abc.abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[K', T]`` (K' <= K) -> mono float audio ``[S]`` at :attr:`sample_rate`."""

    def encode_batch(self, wavs: Sequence[np.ndarray], sample_rates: Sequence[int]) -> list[torch.Tensor]:
        """Encode several recordings; the default runs them one by one."""
        return [self.encode(w, sr) for w, sr in zip(wavs, sample_rates)]

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for ``num_samples`` samples at :attr:`sample_rate` (last one padded)."""
        samples_per_frame = self.sample_rate / self.frame_rate
        return math.ceil(num_samples / samples_per_frame)

    def metadata(self) -> dict:
        """The ``codec`` entry of ``soda_meta.json`` (see :mod:`soda_mega.data.schema`)."""
        return {"name": self.name, "sample_rate": self.sample_rate, "frame_rate": self.frame_rate,
                "num_codebooks": self.num_codebooks, "codebook_size": self.codebook_size,
                "weights": None, "weights_sha256": None, "random_init": False}


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def to_mono(wav: np.ndarray | torch.Tensor, sample_rate: int, target_rate: int) -> np.ndarray:
    """``[S]`` or ``[C, S]`` float audio -> mono float32 ``[S']`` at ``target_rate``.

    Channels are averaged; resampling is :func:`soda_mega.data.resample.resample` (windowed
    sinc, zero delay, exact length).
    """
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=0) if wav.shape[0] > 1 else wav[0]
    elif wav.ndim != 1:
        raise ValueError(f"audio must be [samples] or [channels, samples], got shape {wav.shape}")
    if sample_rate != target_rate and wav.size:
        wav = resample(torch.from_numpy(np.ascontiguousarray(wav)), sample_rate, target_rate).numpy()
    return np.ascontiguousarray(wav)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("data.codec_device is 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(device)


def _calibration_signal(seconds: float = 8.0, seed: int = 0) -> torch.Tensor:
    """A fixed mix of noise bursts, glides and silence at 24 kHz, shape ``[1, 1, S]``."""
    rng = np.random.default_rng(seed)
    n = int(seconds * MIMI_SAMPLE_RATE)
    t = np.arange(n) / MIMI_SAMPLE_RATE
    noise = 0.1 * rng.standard_normal(n) * (np.sin(2.1 * t) > 0)
    glide = 0.3 * np.sin(2 * np.pi * (120 + 50 * t) * t) * (np.sin(5 * t) > 0.2)
    return torch.tensor(noise + glide, dtype=torch.float32)[None, None]


@torch.no_grad()
def _calibrate_random_codebooks(model, seed: int) -> None:
    """Give a randomly initialised Mimi usable codebooks (see the module docstring).

    For each residual level in order, centroids are ``mean + std * N(0, 1)`` of the residual
    latents that level sees on :func:`_calibration_signal`, drawn from a generator seeded with
    ``seed``. Runs on CPU so that every process and device gets the same codec.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    emb = model._encode_to_unquantized_latent(_calibration_signal(seed=seed))
    for rvq in (model.quantizer.rvq_first, model.quantizer.rvq_rest):
        residual = rvq.input_proj(emb) if rvq.input_proj is not None else emb
        for layer in rvq.vq.layers:
            flat = residual.transpose(1, 2).reshape(-1, residual.shape[1])
            flat = layer.project_in(flat)
            mean, std = flat.mean(0), flat.std(0)
            book = layer._codebook
            centroids = mean + std * torch.randn(book.codebook_size, flat.shape[1], generator=generator)
            book.embedding_sum.copy_(centroids)
            book.cluster_usage.fill_(1.0)
            book._initialized.fill_(1.0)
            book._embedding = None
            book._cached_initialized = False
            codes = layer.encode(residual)
            residual = residual - layer.decode(codes)


def warn_random_init(seed: int) -> None:
    """The loud stderr banner for a codec without weights."""
    bar = "!" * 78
    print(f"{bar}\n!! Mimi has NO WEIGHTS (data.mimi_weights / --mimi-weights not given): using a\n"
          f"!! randomly initialised Mimi (seed {seed}). Its codes are NOT real audio tokens; the\n"
          f"!! dataset is marked codec.random_init = true. Fine for tests and the demo, never for\n"
          f"!! training a real model: pass --mimi-weights PATH (a local Mimi .safetensors file).\n{bar}",
          file=sys.stderr, flush=True)


class MimiCodec(Codec):
    """Mimi through ``moshi``: 24 kHz mono, 12.5 frames/s, the first ``num_codebooks`` codebooks."""

    name = "mimi"

    def __init__(self, weights: str | Path | None = None, num_codebooks: int = 8, *,
                 device: str = "auto", chunk_seconds: float = 10.0, batch_size: int = 8,
                 seed: int = 0, weights_sha256: str | None = None, warn: bool = True) -> None:
        if not 1 <= num_codebooks <= MIMI_MAX_CODEBOOKS:
            raise ValueError(f"Mimi has {MIMI_MAX_CODEBOOKS} codebooks; num_codebooks must be in "
                             f"1..{MIMI_MAX_CODEBOOKS}, got {num_codebooks}")
        from moshi.models.loaders import get_mimi

        self.device = resolve_device(device)
        self.weights = str(Path(weights).resolve()) if weights is not None else None
        self.seed = seed
        self._num_codebooks = num_codebooks
        if self.weights is not None:
            state = read_mimi_weights(self.weights)
            self.weights_sha256 = weights_sha256 or file_sha256(self.weights)
            with torch.random.fork_rng(devices=[]):  # the init is overwritten by the weights
                model = get_mimi(None, device="cpu", num_codebooks=num_codebooks)
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                raise CodecWeightsError(
                    f"Mimi weights {self.weights}: not the weights of Mimi (moshi's MimiModel): "
                    f"{str(err).strip().splitlines()[0][:300]}") from None
            model.set_num_codebooks(num_codebooks)
        else:
            self.weights_sha256 = None
            if warn:
                warn_random_init(seed)
            # NOTE: fork_rng keeps the caller's global RNG untouched; the codec depends on `seed` only.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = get_mimi(None, device="cpu", num_codebooks=num_codebooks)
            _calibrate_random_codebooks(model, seed)
        self.model = model.to(self.device).eval()
        self.frame_size = int(self.model.frame_size)
        self.configure(chunk_seconds, batch_size)

    def configure(self, chunk_seconds: float, batch_size: int) -> None:
        """Streaming step and GPU batch size: memory and speed, not the codes (up to the float
        rounding described in the module docstring)."""
        self.chunk_frames = max(1, round(chunk_seconds * MIMI_FRAME_RATE))
        self.batch_size = batch_size if self.device.type == "cuda" else 1

    @property
    def sample_rate(self) -> int:
        return MIMI_SAMPLE_RATE

    @property
    def frame_rate(self) -> float:
        return MIMI_FRAME_RATE

    @property
    def num_codebooks(self) -> int:
        return self._num_codebooks

    @property
    def codebook_size(self) -> int:
        return MIMI_CODEBOOK_SIZE

    @property
    def random_init(self) -> bool:
        return self.weights is None

    def metadata(self) -> dict:
        return mimi_metadata(self.num_codebooks, self.weights, self.weights_sha256, self.seed)

    def num_frames(self, num_samples: int) -> int:
        return -(-num_samples // self.frame_size)

    # ----------------------------------------------------------------- encode
    def encode(self, wav, sample_rate: int | None = None) -> torch.Tensor:
        return self.encode_batch([wav], [sample_rate or self.sample_rate])[0]

    @torch.no_grad()
    def encode_batch(self, wavs: Sequence, sample_rates: Sequence[int]) -> list[torch.Tensor]:
        """Encode recordings in padded batches of ``batch_size`` (1 on CPU), longest first."""
        mono = [to_mono(w, sr, self.sample_rate) for w, sr in zip(wavs, sample_rates)]
        for i, m in enumerate(mono):
            if m.size == 0:
                raise ValueError(f"recording {i} of the batch is empty (0 samples)")
        out: list[torch.Tensor | None] = [None] * len(mono)
        order = sorted(range(len(mono)), key=lambda i: -mono[i].size)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            codes = self._encode_padded([mono[i] for i in idx])
            for i, c in zip(idx, codes):
                out[i] = c
        return out  # type: ignore[return-value]

    def _encode_padded(self, mono: list[np.ndarray]) -> list[torch.Tensor]:
        from moshi.utils.compile import no_cuda_graph

        frames = [self.num_frames(m.size) for m in mono]
        total = max(frames) * self.frame_size
        batch = torch.zeros(len(mono), 1, total)
        for b, m in enumerate(mono):
            batch[b, 0, :m.size] = torch.from_numpy(m)
        step = self.chunk_frames * self.frame_size
        pieces = []
        # NOTE: streaming mode keeps the encoder's state between chunks, so chunking bounds memory
        # without changing the result; CUDA graphs are off because the last chunk is shorter.
        with no_cuda_graph(), self.model.streaming(len(mono)):
            for s in range(0, total, step):
                chunk = batch[..., s:s + step].to(self.device)
                pieces.append(self.model.encode(chunk).cpu())
        codes = torch.cat(pieces, dim=-1).long()
        return [codes[b, :, :n].contiguous() for b, n in enumerate(frames)]

    # ----------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        from moshi.utils.compile import no_cuda_graph

        if codes.dim() != 2 or not 1 <= codes.shape[0] <= self.num_codebooks:
            raise ValueError(f"codes must be [K', T] with K' in 1..{self.num_codebooks}, "
                             f"got {tuple(codes.shape)}")
        codes = codes.long().to(self.device)[None]
        pieces = []
        with no_cuda_graph(), self.model.streaming(1):
            for s in range(0, codes.shape[-1], self.chunk_frames):
                pieces.append(self.model.decode(codes[..., s:s + self.chunk_frames]).cpu())
        return torch.cat(pieces, dim=-1)[0, 0].float()


# NOTE: building Mimi takes seconds (without weights, most of it is calibrating the codebooks),
# so the last codec built through shared_mimi is kept for the next user in the same process:
# the demo builds twice, `eval speech` encodes and decodes, tests build and evaluate many times.
# One codec at a time: a different setting replaces it.
_SHARED: dict[str, MimiCodec] = {}


def shared_mimi(*, chunk_seconds: float = 10.0, batch_size: int = 8, **settings) -> MimiCodec:
    """The :class:`MimiCodec` of ``settings`` (its constructor's arguments but ``warn``), the
    one built last in this process when its settings were the same, set to this caller's
    ``chunk_seconds`` and ``batch_size`` (they change speed and memory, not the model).

    Callers configure it on every call, so one caller's ``configure`` never reaches the next.
    A weights file is part of the key with its size and modification time: a file replaced
    at the same path builds a new codec."""
    weights = settings.get("weights")
    stamp = None
    if weights is not None and Path(weights).is_file():
        st = os.stat(weights)
        stamp = [str(Path(weights).resolve()), st.st_size, st.st_mtime_ns]
    device = str(resolve_device(settings.get("device", "auto")))  # "auto" and "cpu" are one codec on CPU
    key = json.dumps({**settings, "device": device, "_file": stamp}, sort_keys=True, default=str)
    codec = _SHARED.get(key)
    if codec is None:
        _SHARED.clear()  # (the old codec's memory goes before the new one is built)
        codec = _SHARED[key] = MimiCodec(**settings, warn=False)
    codec.configure(chunk_seconds, batch_size)
    return codec


def mimi_metadata(num_codebooks: int, weights: str | None, weights_sha256: str | None,
                  seed: int) -> dict:
    """``codec`` entry of ``soda_meta.json`` for Mimi, without building the model."""
    meta = {"name": MimiCodec.name, "sample_rate": MIMI_SAMPLE_RATE, "frame_rate": MIMI_FRAME_RATE,
            "num_codebooks": num_codebooks, "codebook_size": MIMI_CODEBOOK_SIZE,
            "weights": weights, "weights_sha256": weights_sha256, "random_init": weights is None}
    if weights is None:
        meta["seed"] = seed
    return meta


def precomputed_codec_metadata(num_codebooks: int, codebook_size: int) -> dict:
    """``codec`` entry of a dataset built only from pre-encoded ``.npy`` codes."""
    return {"name": "precomputed", "sample_rate": MIMI_SAMPLE_RATE, "frame_rate": MIMI_FRAME_RATE,
            "num_codebooks": num_codebooks, "codebook_size": codebook_size, "weights": None,
            "weights_sha256": None, "random_init": False}
