"""The device path of `data build` (issue 17, item 1): one codec worker per device, each fed by
its own decode/resample processes. Run with 2 fake GPUs (device names only, the codec on CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from build_helpers import tiny_config, tone, tree_bytes, wav_bytes, write_manifest
from soda_mega.data.codec import MIMI_SAMPLE_RATE, to_mono
from soda_mega.data.write.build_worker import decode_for_codec
from soda_mega.data.write.builder import build_dataset
from soda_mega.data.write.devices import codec_devices, device_for_slot, feeders_per_device
from soda_mega.data.write.inputs import InputError, read_audio


def test_device_choice_and_slots():
    assert codec_devices(["cpu:0", "cpu:1"], "auto") == ["cpu:0", "cpu:1"]
    assert codec_devices([], "cpu") == []
    import torch

    if not torch.cuda.is_available():
        assert codec_devices([], "auto") == []  # the CPU path, as before
        with pytest.raises(RuntimeError, match="no CUDA device"):
            codec_devices([], "cuda")
        with pytest.raises(RuntimeError, match="codec_devices names a cuda device"):
            codec_devices(["cuda:0"], "auto")
    else:
        assert codec_devices([], "auto") == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    with pytest.raises(ValueError, match="'gpu0' is not a device"):
        codec_devices(["gpu0"], "auto")
    devices = ["cuda:0", "cuda:1"]
    assert [device_for_slot(devices, s) for s in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert feeders_per_device(8, 128) == 15 and feeders_per_device(8, 8) == 1
    assert feeders_per_device(1, 256) == 16 and feeders_per_device(2, 2) == 1


def test_feeder_output_is_what_the_codec_resamples_itself(tmp_path):
    path = tmp_path / "a.wav"
    path.write_bytes(wav_bytes((np.stack([tone(0.4, 16000)] * 2) * 32767).astype("<i2"), 16000))
    mono, seconds = decode_for_codec(str(path))
    wav, rate = read_audio(path)
    assert seconds == pytest.approx(0.4) and mono.dtype == np.float32
    np.testing.assert_array_equal(mono, to_mono(wav, rate, MIMI_SAMPLE_RATE))
    err, zero = decode_for_codec(str(tmp_path / "missing.wav"))
    assert isinstance(err, InputError) and zero == 0.0


def test_two_fake_gpus_each_worker_its_own_device_same_bytes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    records = []
    for i, (seconds, rate) in enumerate([(0.5, 16000), (0.4, 24000), (0.6, 22050), (0.3, 16000)]):
        (src / f"{i}.wav").write_bytes(wav_bytes((tone(seconds, rate, 180 + 40 * i) * 32767).astype("<i2"), rate))
        records.append({"id": f"r{i}", "audio": f"{i}.wav", "transcript": f"words {i}"})
    records.append({"id": "bad", "audio": "missing.wav", "transcript": "x"})
    manifest = write_manifest(src / "m.jsonl", records)
    opts = ("--data.valid_fraction=0", "--data.build_unit_recordings=2", "--data.encode_chunk_seconds=0.4")
    cpu = build_dataset(tmp_path / "cpu", [manifest], "speech", tiny_config(*opts), show_progress=False)
    assert len(cpu.worker_devices) == 1 and set(cpu.worker_devices.values()) == {"cpu"}
    fake = build_dataset(tmp_path / "fake", [manifest], "speech",
                         tiny_config(*opts, "--data.codec_devices=[cpu:0, cpu:1]"), show_progress=False)
    assert len(fake.worker_devices) == 2  # one codec worker per device ...
    assert sorted(fake.worker_devices.values()) == ["cpu:0", "cpu:1"]  # ... each on its own
    assert [s["record"] for s in fake.skipped] == ["bad (m.jsonl:5)"]
    assert tree_bytes(tmp_path / "fake") == tree_bytes(tmp_path / "cpu")
