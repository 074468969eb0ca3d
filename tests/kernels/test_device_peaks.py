"""The loss plan's datasheet peaks (flce_roofline): each board told apart by the name
``torch.cuda.get_device_name`` returns, with its source; an unknown name is not guessed."""

from __future__ import annotations

import logging

import pytest

from soda_kernels.flce_roofline import DEFAULT_PEAK, PEAKS, device_peak, find_peak, require_peak

# Names as the NVIDIA driver reports them (nvidia-smi / torch.cuda.get_device_name).
NAMES = {
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200 SXM",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA A100-SXM4-40GB": "A100 SXM 40GB",
    "NVIDIA A100-SXM4-80GB": "A100 SXM 80GB",
    "NVIDIA A100-PCIE-40GB": "A100 PCIe 40GB",
    "NVIDIA A100 80GB PCIe": "A100 PCIe 80GB",
}
UNKNOWN = ("NVIDIA GH200 480GB", "NVIDIA L40S", "NVIDIA GeForce RTX 4090", "NVIDIA H100", "")


@pytest.mark.parametrize("name", sorted(NAMES))
def test_each_board_is_told_apart(name):
    peak = device_peak(name)
    assert peak.name == NAMES[name] and find_peak(name) is peak and require_peak(name) is peak
    assert peak.source.startswith("NVIDIA ") and NAMES[name].split()[0] in peak.source


def test_boards_differ_where_their_datasheets_do():
    sxm, pcie, nvl = (device_peak(f"NVIDIA H100 {s}") for s in ("80GB HBM3", "PCIe", "NVL"))
    assert pcie.matmul_flops[2] < nvl.matmul_flops[2] < sxm.matmul_flops[2]
    assert pcie.hbm_bytes_per_s < sxm.hbm_bytes_per_s < nvl.hbm_bytes_per_s
    assert device_peak("NVIDIA H200").hbm_bytes_per_s > sxm.hbm_bytes_per_s
    assert device_peak("NVIDIA A100-SXM4-80GB").hbm_bytes_per_s > device_peak(
        "NVIDIA A100-SXM4-40GB").hbm_bytes_per_s
    # The short keys the plans and benchmarks use are the SXM boards.
    assert PEAKS["H100"] is sxm and PEAKS["H200"] is device_peak("NVIDIA H200")
    assert device_peak(None) is sxm  # compile_check's meta launches


def test_unknown_names_are_not_guessed(caplog):
    for name in UNKNOWN:
        assert find_peak(name) is None, name
        with pytest.raises(ValueError, match="no datasheet peaks for GPU"):
            require_peak(name)
    with caplog.at_level(logging.WARNING, logger="soda_kernels.flce"):
        assert device_peak("NVIDIA L40S") is DEFAULT_PEAK
        assert device_peak("NVIDIA L40S") is DEFAULT_PEAK
    lines = [r.getMessage() for r in caplog.records if "L40S" in r.getMessage()]
    assert len(lines) <= 1 and all("\n" not in line for line in lines)
