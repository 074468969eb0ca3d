"""GPU telemetry: the sampling thread and summaries through a fake NVML, and the no-driver path
(real NVML where this machine has no driver, and a fake that fails). Nothing here is timed."""

from __future__ import annotations

import json
import time
import types

import pytest

from soda_mega.utils import telemetry as tm
from soda_mega.utils.telemetry import GpuTelemetry


class FakeNVMLError(Exception):
    pass


def fake_nvml(util=(10, 50, 90), power_supported=True, init_error=None):
    """A pynvml stand-in: utilisation cycles through ``util``; the other fields are fixed."""
    calls = {"util": 0, "init": 0, "shutdown": 0}

    def init():
        calls["init"] += 1
        if init_error is not None:
            raise init_error

    def utilization(handle):
        value = util[calls["util"] % len(util)]
        calls["util"] += 1
        return types.SimpleNamespace(gpu=value, memory=0)

    def power(handle):
        if not power_supported:
            raise FakeNVMLError("Not Supported")
        return 350_500  # mW

    def by_bus_id(bus_id):
        raise FakeNVMLError("no such bus id")

    return types.SimpleNamespace(
        calls=calls,
        NVML_CLOCK_SM=1, NVML_TEMPERATURE_GPU=0,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1),
        nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
        nvmlDeviceGetHandleByPciBusId=by_bus_id,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetUtilizationRates=utilization,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=12 * 2**30, total=80 * 2**30),
        nvmlDeviceGetPowerUsage=power,
        nvmlDeviceGetClockInfo=lambda h, clock: 1980 if clock == 1 else 0,
        nvmlDeviceGetTemperature=lambda h, sensor: 61 if sensor == 0 else -1,
    )


@pytest.fixture(autouse=True)
def fresh_notice(monkeypatch):
    monkeypatch.setattr(tm, "_NOTICE_SHOWN", False)


def test_background_thread_samples_and_summarises():
    nvml = fake_nvml()
    tel = GpuTelemetry(interval_s=0.005, nvml=nvml)
    assert tel.available and tel.device_name == "NVIDIA H100 80GB HBM3"
    tel.start()
    deadline = time.time() + 10
    while len(tel.samples) < 6 and time.time() < deadline:
        time.sleep(0.01)
    summary = tel.stop()
    assert tel._thread is None
    samples = list(tel.samples)
    assert len(samples) >= 6, "the sampling thread did not run"
    utils = [s["gpu_util"] for s in samples]
    assert set(utils) == {10.0, 50.0, 90.0}  # the fake's cycle, read in order
    assert summary["gpu_samples"] == len(samples)
    assert summary["gpu_util"] == pytest.approx(sum(utils) / len(utils))
    assert summary["gpu_util_max"] == 90.0
    assert summary["gpu_mem_used_gib"] == pytest.approx(12.0)  # bytes -> GiB
    assert summary["gpu_power_w"] == pytest.approx(350.5)      # mW -> W
    assert summary["gpu_sm_clock_mhz"] == summary["gpu_sm_clock_mhz_min"] == 1980.0
    assert summary["gpu_temp_c_max"] == 61.0
    n = len(tel.samples)
    time.sleep(0.05)
    assert len(tel.samples) == n, "the thread kept sampling after stop()"
    tel.close()
    assert nvml.calls["shutdown"] == 1


def test_windows_reset_and_run_summary_keeps_everything():
    tel = GpuTelemetry(interval_s=1.0, nvml=fake_nvml())
    for util, clock in ((20, 1900), (40, 1500), (60, 1800)):
        tel.record({"gpu_util": util, "gpu_sm_clock_mhz": clock, "gpu_power_w": None})
    first = tel.window()
    assert first["gpu_util"] == pytest.approx(40.0) and first["gpu_util_max"] == 60
    assert first["gpu_sm_clock_mhz_min"] == 1500 and first["gpu_samples"] == 3
    assert "gpu_power_w" not in first  # a field the GPU does not report is left out
    assert tel.window() == {}  # nothing since the last window
    tel.record({"gpu_util": 100, "gpu_sm_clock_mhz": 1000})
    assert tel.window()["gpu_util"] == 100
    run = tel.summary()
    assert run["gpu_samples"] == 4 and run["gpu_util"] == pytest.approx(55.0)
    assert run["gpu_sm_clock_mhz_min"] == 1000
    tel.reset()
    assert tel.summary() == {}


def test_field_the_gpu_does_not_report_is_not_an_error():
    tel = GpuTelemetry(interval_s=1.0, nvml=fake_nvml(power_supported=False))
    tel.record(tel.sample())
    summary = tel.summary()
    assert "gpu_power_w" not in summary and summary["gpu_util"] == 10.0


def test_no_driver_gives_one_line_notice_and_empty_summaries(capsys):
    nvml = fake_nvml(init_error=FakeNVMLError("NVML Shared Library Not Found"))
    tel = GpuTelemetry(interval_s=0.01, nvml=nvml)
    assert not tel.available
    with tel:
        pass
    assert tel.summary() == {} and tel.window() == {} and tel.stop() == {}
    GpuTelemetry(nvml=nvml)  # a second sampler in the same process stays quiet
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GPU telemetry off" in err and "NVML Shared Library" in err


def test_missing_nvidia_ml_py_is_the_same_notice(monkeypatch, capsys):
    def no_module():
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(tm, "_load_nvml", no_module)
    tel = GpuTelemetry()
    assert not tel.available and tel.summary() == {}
    assert "GPU telemetry off" in capsys.readouterr().err


def test_real_nvml_on_a_machine_without_driver():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - the path under test
        tel = GpuTelemetry(interval_s=0.01).start()
        assert not tel.available and tel.stop() == {}
        assert "NVML" in tel.notice
        return
    pynvml.nvmlShutdown()
    pytest.skip("this machine has an NVIDIA driver")


def test_training_logs_telemetry_every_log_interval(tmp_path, monkeypatch, capsys):
    """A real (tiny, CPU) training run with the fake NVML: the log-interval records carry the
    window's GPU keys, and the run ends with a per-run telemetry record."""
    from soda_mega.config import load_config
    from soda_mega.perf import harness

    nvml = fake_nvml(util=(42,))
    monkeypatch.setattr(tm, "_load_nvml", lambda: nvml)
    base = load_config(preset="tiny", overrides=["--training.global_batch_size=4"])
    data = harness.synthetic_corpus(tmp_path / "corpus", base, min_tokens=40_000)
    cfg = harness.measurement_config(base, tmp_path / "run", data,
                                     ["--run.max_steps=2", "--run.log_interval=1"])
    trainer = harness.build_trainer(cfg)
    try:
        trainer.run()
    finally:
        harness.release(trainer)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    first = train[0]  # start() samples at once, so the first window has data
    assert first["gpu_util"] == 42.0 and first["gpu_power_w"] == pytest.approx(350.5)
    assert first["gpu_mem_used_gib"] == pytest.approx(12.0) and first["gpu_samples"] >= 1
    (summary,) = [r for r in records if r["kind"] == "telemetry"]
    assert summary["step"] == 2 and summary["gpu_util_max"] == 42.0
    assert summary["gpu_samples"] >= 2  # + the last sample taken at stop()
    assert "gpu_util 42" in capsys.readouterr().out
    assert nvml.calls["shutdown"] == 1
