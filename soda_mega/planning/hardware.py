"""The GPUs the planner knows: datasheet peaks, links, and the achieved fractions it charges.

Every number is a named field; :data:`SOURCES` says where each comes from. Datasheet figures
are NVIDIA's (dense bf16, the sparse figures halved; ``../shared/PUBLISHED_THROUGHPUT.md``
lists them). The achieved fractions (``gemm_large``, ``hbm_efficiency``, ``link_efficiency``)
are *assumptions* from public measurements of other code (cuBLAS GEMM sweeps, STREAM-like
copies, nccl-tests bus bandwidth), not measurements of soda-mega: the GPU campaign replaces
them (:mod:`soda_mega.planning.calibrate`).

NOTE: :func:`soda_kernels.flce_roofline.device_peak` tells fewer kinds apart (another change
refines it); the planner keeps its own table because it also needs memory size and links.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9


@dataclass(frozen=True)
class GpuSpec:
    """One GPU kind as the step-time model sees it (rates in FLOP/s and bytes/s)."""

    name: str
    #: dense bf16 tensor-core peak (datasheet)
    peak_flops: float
    #: HBM bandwidth (datasheet)
    hbm_bytes_per_s: float
    #: memory per GPU, GiB usable by the allocator (datasheet capacity)
    memory_gib: float
    #: GPU-to-GPU bandwidth inside a node, one direction (NVLink; PCIe cards: the PCIe link)
    intra_node_bytes_per_s: float
    #: GPUs that share that intra-node bandwidth (8 on an HGX board; 2 for NVL bridge pairs)
    intra_node_group: int
    #: inter-node bandwidth per GPU, one direction (InfiniBand NIC per GPU)
    inter_node_bytes_per_s: float
    #: achieved fraction of ``peak_flops`` by a large bf16 GEMM (assumed, see SOURCES)
    gemm_large: float
    #: achieved fraction of ``hbm_bytes_per_s`` by a streaming kernel (assumed)
    hbm_efficiency: float = 0.8
    #: achieved NCCL bus bandwidth over the link's one-direction rate (assumed)
    link_efficiency: float = 0.8

    def with_gpus_per_node(self, gpus_per_node: int) -> GpuSpec:
        """The same GPU in nodes of ``gpus_per_node`` (an NVLink domain no larger than that)."""
        group = min(self.intra_node_group, gpus_per_node)
        return self if group == self.intra_node_group else replace(self, intra_node_group=group)


GPUS: dict[str, GpuSpec] = {
    "h100-sxm": GpuSpec("H100 SXM 80GB", 989e12, 3.35e12, 80, 450 * GB, 8, 50 * GB, 0.70),
    "h100-pcie": GpuSpec("H100 PCIe 80GB", 756e12, 2.0e12, 80, 64 * GB, 8, 50 * GB, 0.70),
    "h100-nvl": GpuSpec("H100 NVL 94GB", 835e12, 3.9e12, 94, 300 * GB, 2, 50 * GB, 0.70),
    "h200": GpuSpec("H200 SXM 141GB", 989e12, 4.8e12, 141, 450 * GB, 8, 50 * GB, 0.70),
    "a100": GpuSpec("A100 SXM 80GB", 312e12, 2.039e12, 80, 300 * GB, 8, 25 * GB, 0.85),
}
ALIASES = {"h100": "h100-sxm", "h100sxm": "h100-sxm", "h100-80gb": "h100-sxm",
           "h100pcie": "h100-pcie", "h100nvl": "h100-nvl", "h200-sxm": "h200",
           "a100-80gb": "a100", "a100-sxm": "a100"}

SOURCES = {
    "peak_flops": "NVIDIA datasheets, dense bf16 (H100 SXM 989, PCIe 756, NVL 835, H200 989, "
                  "A100 312 TFLOP/s)",
    "hbm_bytes_per_s": "NVIDIA datasheets (3.35, 2.0, 3.9, 4.8, 2.039 TB/s)",
    "memory_gib": "NVIDIA datasheets (80, 80, 94, 141, 80 GB)",
    "intra_node_bytes_per_s": "NVLink 4 900 GB/s bidirectional = 450 per direction (HGX H100/H200); "
                              "NVL bridge 600 GB/s pairs; A100 NVLink 3 600 GB/s; PCIe Gen5 x16 64 GB/s",
    "inter_node_bytes_per_s": "one NIC per GPU: NDR 400 Gb/s on DGX H100 (datasheet); HDR 200 Gb/s "
                              "on DGX A100 / Selene (Korthikanti et al. 2022)",
    "gemm_large": "assumed: 0.70 on Hopper, the fused-loss roofline's MATMUL_EFFICIENCY "
                  "(cuBLAS bf16 large GEMMs reach 70-80% of the H100 SXM peak alone, less under "
                  "training's power and communication load); 0.85 on A100 (cuBLAS ~265 of 312 "
                  "TFLOP/s); replaced by the campaign's env.matmul_peak when a gpu_*.json exists",
    "hbm_efficiency": "assumed: streaming copies reach ~80% of HBM bandwidth (the fused-loss "
                      "roofline's BANDWIDTH_EFFICIENCY)",
    "link_efficiency": "assumed: nccl-tests all-reduce bus bandwidth ~360 of 450 GB/s on HGX H100 "
                       "(and ~80% of NDR per NIC)",
}


def gpu_spec(name: str) -> GpuSpec:
    """The table entry for ``name`` (``h100-sxm``, ``h100-pcie``, ``h100-nvl``, ``h200``,
    ``a100``; case and ``_`` / spaces ignored); ValueError naming the choices otherwise."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = ALIASES.get(key, ALIASES.get(key.replace("-", ""), key))
    if key not in GPUS:
        raise ValueError(f"--gpu: unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    return GPUS[key]
