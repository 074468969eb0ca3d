"""Mimi through the Codec interface: shapes, rates, resampling, down-mix, chunking, weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from soda_mega.data.codec import MimiCodec, file_sha256, shared_mimi, to_mono, warn_random_init
from soda_mega.data.write.demo import FALLBACK
from soda_mega.data.write.inputs import read_audio

SECONDS = 3


@pytest.fixture(scope="module")
def codec():
    return MimiCodec(None, 8, device="cpu", chunk_seconds=10.0, warn=False)


@pytest.fixture(scope="module")
def small_chunks():
    """Same seed, 0.8 s streaming steps (10 frames); records whether the global RNG moved."""
    state = torch.get_rng_state()
    codec = MimiCodec(None, 8, device="cpu", chunk_seconds=0.8, warn=False)
    codec.rng_untouched = torch.equal(torch.get_rng_state(), state)
    return codec


@pytest.fixture(scope="module")
def speech():
    """Three seconds of shipped espeak-ng speech at 16 kHz, float32 [S]."""
    wav, rate = read_audio(FALLBACK / "fallback_0.wav")
    assert rate == 16000
    return wav[0, :SECONDS * rate]


def test_encode_shape_rate_and_range(codec, speech):
    codes = codec.encode(speech, 16000)
    samples_24k = len(to_mono(speech, 16000, 24000))
    assert samples_24k == SECONDS * 24000
    assert codes.dtype == torch.long and codes.shape == (8, math.ceil(samples_24k / 1920))
    assert abs(codes.shape[1] - SECONDS * 12.5) <= 1
    assert int(codes.min()) >= 0 and int(codes.max()) < codec.codebook_size == 2048
    # the random codebooks are calibrated: codes follow the audio instead of collapsing to one entry
    assert all(len(torch.unique(codes[k])) > 10 for k in range(8))
    assert (codec.sample_rate, codec.frame_rate, codec.num_codebooks) == (24000, 12.5, 8)


def test_the_shared_codec_is_built_once_and_configured_per_caller(codec, speech):
    """Builds and evaluations in one process reuse the last Mimi of the same settings; each
    caller gets its own chunk and batch size, whatever the previous caller set."""
    first = shared_mimi(weights=None, num_codebooks=8, device="cpu", seed=0)
    first.configure(chunk_seconds=0.8, batch_size=3)
    again = shared_mimi(weights=None, num_codebooks=8, device="cpu", seed=0, chunk_seconds=2.0)
    assert again is first and again.chunk_frames == 25 and again.batch_size == 1  # (CPU: 1)
    assert shared_mimi(weights=None, num_codebooks=8, device="cpu", seed=0).chunk_frames == 125
    # the same model as a codec built on its own with these settings
    assert torch.equal(again.encode(speech, 16000), codec.encode(speech, 16000))


def test_resampling_and_downmix(codec, speech):
    ref = codec.encode(speech, 16000)
    stereo = np.stack([speech * 1.5, speech * 0.5])  # mean == speech
    assert torch.equal(codec.encode(torch.from_numpy(stereo), 16000), ref)
    pre = to_mono(speech, 16000, 24000)
    assert torch.equal(codec.encode(pre), ref)  # default rate is the codec's


def test_chunked_equals_one_shot(codec, small_chunks, speech):
    """Streaming in 0.8 s steps vs one step vs Mimi's non-streaming encode.

    NOTE: they agree exactly here; in general float rounding can flip a code whose two nearest
    centroids are almost equidistant, so the test allows 1% (measured worst: 2 in 3080).
    """
    a, b = small_chunks.encode(speech, 16000), codec.encode(speech, 16000)
    with torch.no_grad():
        x = torch.from_numpy(to_mono(speech, 16000, 24000))[None, None]
        c = codec.model.encode(x)[0]
    assert a.shape == b.shape == c.shape
    assert (a == b).float().mean() >= 0.99 and (b == c).float().mean() >= 0.99


def test_padded_batch_equals_single(codec, speech):
    """The GPU batching path (padding after each recording) on CPU: Mimi is causal."""
    short = speech[:int(2.3 * 16000)]
    singles = [codec.encode(speech, 16000), codec.encode(short, 16000)]
    codec.batch_size = 2
    try:
        batched = codec.encode_batch([speech, short], [16000, 16000])
    finally:
        codec.batch_size = 1
    assert [c.shape for c in batched] == [c.shape for c in singles]
    for x, y in zip(batched, singles):
        assert (x == y).float().mean() >= 0.99


def test_seeded_random_init_is_deterministic(codec, small_chunks):
    assert small_chunks.rng_untouched  # building the codec leaves the caller's RNG alone
    other = small_chunks.model.state_dict()
    for name, p in codec.model.state_dict().items():  # same seed, same codec (also in other processes)
        assert torch.equal(p, other[name]), name
    meta = codec.metadata()
    assert meta["random_init"] is True and meta["weights"] is None and meta["seed"] == 0


def test_weights_from_a_local_file(codec, speech, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "mimi.safetensors"
    save_file({k: v.contiguous() for k, v in codec.model.state_dict().items()}, str(path))
    loaded = MimiCodec(path, 8, device="cpu")
    assert torch.equal(loaded.encode(speech, 16000), codec.encode(speech, 16000))
    meta = loaded.metadata()
    assert meta["random_init"] is False and meta["weights_sha256"] == file_sha256(path)
    path.unlink()  # 385 MB: do not leave it in pytest's kept temp folders
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        MimiCodec(tmp_path / "missing.safetensors", 8, device="cpu")


def test_decode(codec, speech):
    codes = codec.encode(speech, 16000)
    wav = codec.decode(codes)
    assert wav.shape == (codes.shape[1] * 1920,) and torch.isfinite(wav).all()
    assert codec.decode(codes[:1, :5]).shape == (5 * 1920,)  # fewer codebooks decode too
    with pytest.raises(ValueError, match="codes must be"):
        codec.decode(codes[None])


def test_bad_audio_and_warning(codec, capsys):
    with pytest.raises(ValueError, match="empty"):
        codec.encode(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="num_codebooks"):
        MimiCodec(None, 33, device="cpu")
    warn_random_init(0)
    assert "NOT real audio tokens" in capsys.readouterr().err
