"""Roofline model of the fused loss's two training designs, and the choice between them.

Both designs compute the same gradients; they differ in work and DRAM traffic:

* **recompute** (:mod:`.flce_backward`): four ``2 N_a H V`` matmuls (forward logits,
  recomputed logits, ``grad_W``, ``grad_h``); ``main_grad`` (fp32 ``V x H``) is read and
  written once, the fp32 ``grad_h`` accumulator once per ``grad_h`` pass.
* **three-matmul** (:mod:`.flce_train`): three matmuls, but ``W`` is read once per chunk of
  ``C`` rows (the logits) and once per group of ``R`` rows (``grad_h``), and ``main_grad`` is
  read and written once per group. Inside the memory budget ``C`` and ``R`` are a few hundred
  rows, so at ``N = 8192`` the ``main_grad`` traffic alone is tens of GB per micro-batch.

Which is faster depends on the device's FLOP/byte balance. The model lists every launch of
a design with its FLOPs and bytes (each operand read once, each output written once; weight
re-reads across a launch's row tiles served by L2) and charges each launch
``max(FLOPs / (peak x MATMUL_EFFICIENCY), bytes / (bandwidth x BANDWIDTH_EFFICIENCY))``: a
launch is either compute- or memory-bound, launches do not overlap. The peaks are datasheet
figures (:data:`PEAKS`: H100 SXM / PCIe / NVL, H200 SXM / NVL, A100 SXM / PCIe 40 / 80GB,
each with its datasheet; a conservative A100-class default, with a warning, for any other
device); the efficiencies are typical achieved fractions, not measurements of this code.
Everything here is **computed, not measured**; it is what the GPU campaign has to confirm.

:func:`choose_train_plan` picks, on a CUDA device, the design (and the chunk / group heights
of the three-matmul design) with the smallest predicted time inside the memory budget. On
CPU it keeps the three-matmul design with one group per chunk (what the CPU measurements of
``bench_throughput`` were made with).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

#: Achieved fractions of the datasheet peaks charged by the model (typical for large bf16
#: GEMMs and streaming kernels on Hopper; assumptions, not measurements of these kernels).
MATMUL_EFFICIENCY = 0.7
BANDWIDTH_EFFICIENCY = 0.8


@dataclass(frozen=True)
class DevicePeak:
    """Datasheet peaks: dense matmul FLOP/s by operand bytes (2: bf16/fp16, 4: TF32), HBM
    bytes/s, NVLink bytes/s per GPU (bidirectional, as datasheets give it; None where the
    board has none) and the datasheet the figures come from."""

    name: str
    matmul_flops: dict
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float | None = None
    source: str = ""

    def seconds(self, flops: float, nbytes: float, elt: int) -> float:
        """Roofline time of one launch (see the module docstring)."""
        peak = self.matmul_flops[2 if elt <= 2 else 4] * MATMUL_EFFICIENCY
        return max(flops / peak, nbytes / (self.hbm_bytes_per_s * BANDWIDTH_EFFICIENCY))


# NOTE: NVIDIA's datasheets print bf16 and TF32 tensor-core figures *with* 2:4 sparsity
# (marked *); the dense figures here are half of those (rounded down). Bandwidths as printed.
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), column "
_H200 = "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200), column "
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100), column "
_TABLE = {
    # H100 SXM5 80GB: bf16 1,979* / TF32 989* TFLOP/s, HBM3 3.35 TB/s, NVLink 900 GB/s.
    "H100 SXM": DevicePeak("H100 SXM", {2: 989e12, 4: 494e12}, 3.35e12, 900e9, _H100 + "H100 SXM"),
    # H100 PCIe 80GB: bf16 1,513* / TF32 756*, HBM2e 2.0 TB/s, NVLink bridge 600 GB/s.
    "H100 PCIe": DevicePeak("H100 PCIe", {2: 756e12, 4: 378e12}, 2.0e12, 600e9, _H100 + "H100 PCIe"),
    # H100 NVL 94GB: bf16 1,671* / TF32 835*, HBM3 3.9 TB/s, NVLink bridge 600 GB/s.
    "H100 NVL": DevicePeak("H100 NVL", {2: 835e12, 4: 417e12}, 3.9e12, 600e9, _H100 + "H100 NVL"),
    # H200 SXM 141GB: bf16 1,979* / TF32 989*, HBM3e 4.8 TB/s, NVLink 900 GB/s.
    "H200 SXM": DevicePeak("H200 SXM", {2: 989e12, 4: 494e12}, 4.8e12, 900e9, _H200 + "H200 SXM"),
    # H200 NVL 141GB: bf16 1,671* / TF32 835*, HBM3e 4.8 TB/s, NVLink bridge 900 GB/s.
    "H200 NVL": DevicePeak("H200 NVL", {2: 835e12, 4: 417e12}, 4.8e12, 900e9, _H200 + "H200 NVL"),
    # A100: bf16 312 (624*) / TF32 156 (312*) on every board; NVLink 600 GB/s (PCIe: bridge
    # for 2 GPUs); HBM2(e) 1,555 / 2,039 GB/s (SXM 40 / 80GB), 1,555 / 1,935 (PCIe 40 / 80GB).
    "A100 SXM 40GB": DevicePeak("A100 SXM 40GB", {2: 312e12, 4: 156e12}, 1.555e12, 600e9,
                                _A100 + "A100 40GB SXM"),
    "A100 SXM 80GB": DevicePeak("A100 SXM 80GB", {2: 312e12, 4: 156e12}, 2.039e12, 600e9,
                                _A100 + "A100 80GB SXM"),
    "A100 PCIe 40GB": DevicePeak("A100 PCIe 40GB", {2: 312e12, 4: 156e12}, 1.555e12, 600e9,
                                 _A100 + "A100 40GB PCIe"),
    "A100 PCIe 80GB": DevicePeak("A100 PCIe 80GB", {2: 312e12, 4: 156e12}, 1.935e12, 600e9,
                                 _A100 + "A100 80GB PCIe"),
}
#: Peak table by board. ``H100`` and ``H200`` (the SXM boards) are kept as the short keys the
#: plans and benchmarks use.
PEAKS = {"H100": _TABLE["H100 SXM"], "H200": _TABLE["H200 SXM"], **_TABLE}
#: Any other CUDA device: A100-class figures (lower FLOP/s and bandwidth than Hopper).
DEFAULT_PEAK = DevicePeak("default (A100-class)", {2: 312e12, 4: 156e12}, 1.55e12)

# ``torch.cuda.get_device_name`` -> board, first match wins (upper-cased). The names the
# driver reports: "NVIDIA H100 80GB HBM3" (SXM5), "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
# "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB",
# "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe". NOTE: a bare "H200" would also match
# "GH200" (Grace Hopper: other memory, not in the table), hence the word boundaries.
_NAMES = (
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe"),
    (r"\bH100\b.*(\bSXM|\bHBM3\b)", "H100 SXM"),
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200 SXM"),
    (r"\bA100\b.*\bSXM.*\b80GB\b", "A100 SXM 80GB"),
    (r"\bA100\b.*\bSXM", "A100 SXM 40GB"),
    (r"\bA100\b.*(\b80GB\b.*\bPCIE\b|\bPCIE\b.*\b80GB\b)", "A100 PCIe 80GB"),
    (r"\bA100\b.*\bPCIE\b", "A100 PCIe 40GB"),
)
_WARNED: set = set()


def find_peak(name: str | None) -> DevicePeak | None:
    """The table entry of a CUDA device name (``torch.cuda.get_device_name``), or None when
    the name is not one of the boards above (no guess, no warning)."""
    if not name:
        return None
    upper = name.upper()
    return next((_TABLE[key] for pattern, key in _NAMES if re.search(pattern, upper)), None)


def device_peak(name: str | None) -> DevicePeak:
    """The peaks the loss plan uses for a CUDA device name; ``None`` (e.g. compile_check's
    ``meta`` launches) is an H100 SXM. A name not in the table gets :data:`DEFAULT_PEAK`
    and one warning per name on the ``soda_kernels.flce`` logger."""
    if name is None:
        return PEAKS["H100"]
    peak = find_peak(name)
    if peak is None:
        if name not in _WARNED:
            _WARNED.add(name)
            logging.getLogger("soda_kernels.flce").warning(
                "no datasheet peaks for GPU %r: the loss plan's roofline uses %s figures "
                "(add the board to soda_kernels.flce_roofline._TABLE)", name, DEFAULT_PEAK.name)
        return DEFAULT_PEAK
    return peak


def require_peak(name: str | None) -> DevicePeak:
    """:func:`find_peak` for callers that cannot go on without true peaks: a ``ValueError``
    that names the device when it is not in the table."""
    peak = find_peak(name)
    if peak is None:
        raise ValueError(f"no datasheet peaks for GPU {name!r}; known boards: "
                         f"{', '.join(_TABLE)} (add it to soda_kernels.flce_roofline._TABLE)")
    return peak


# ============================================================================ launches
@dataclass
class Launches:
    """The launches of one design: ``(name, flops, bytes)`` per kind of launch (summed over
    its ``count(name)`` launches)."""

    items: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    def add(self, name: str, flops: float, nbytes: float, times: int = 1) -> None:
        if times > 0:
            self.items.append((name, float(flops) * times, float(nbytes) * times))
            self.counts[name] = self.counts.get(name, 0) + times

    def count(self, name: str) -> int:
        return self.counts.get(name, 0)

    @property
    def flops(self) -> int:
        return int(sum(f for _, f, _ in self.items))

    @property
    def bytes(self) -> int:
        return int(sum(b for _, _, b in self.items))

    def bytes_of(self, name: str) -> int:
        return int(sum(b for n, _, b in self.items if n == name))

    def seconds(self, peak: DevicePeak, elt: int) -> float:
        return sum(peak.seconds(f, b, elt) for _, f, b in self.items)


def ideal_work(n: int, h: int, n_valid: int, elt: int, main_grad: bool) -> dict:
    """The floor of any design: ``6 N H V`` FLOPs (what a loss that kept its logits needs), and
    ``W`` and ``h`` read once, ``grad_W`` (fp32 read + write into ``main_grad``) and ``grad_h``
    written once."""
    return {"ideal_flops": 6 * n * h * n_valid,
            "ideal_bytes": 2 * n * h * elt + n_valid * h * (elt + (8 if main_grad else elt))}


def _ceil(a: int, b: int) -> int:
    return -(-a // max(1, b))


def _parts(total: int, step: int) -> list[tuple[int, int]]:
    """``(height, count)`` of the pieces of ``total`` rows cut every ``step``."""
    if total <= 0:
        return []
    full, rest = divmod(total, max(1, step))
    return [(step, full)] * bool(full) + [(rest, 1)] * bool(rest)


def _rows(n: int, n_active: int, h: int, elt: int) -> tuple[float, float]:
    """Bytes outside the matmuls, common shape: the row gather (read ``N``, write ``N_a``
    rows) and the scatter of ``grad_hidden`` (read ``N_a`` fp32 rows, write ``N`` rows)."""
    return n * h * elt + n_active * h * elt, 4 * n_active * h + n * h * elt


def recompute_launches(n: int, n_active: int, h: int, v: int, elt: int, vocab_slice: int,
                       main_grad: bool = True, grad_h_slices: int = 1) -> Launches:
    """Launches of the recompute design: forward statistics, then per vocabulary slice
    ``dlogits`` (recomputed logits) and ``grad_W[slice]``, and per ``grad_h_slices`` slices one
    ``grad_h`` pass that reads and writes the fp32 accumulator (the first only writes it)."""
    out = Launches()
    if not n_active or not v:
        return out
    gather, scatter = _rows(n, n_active, h, elt)
    out.add("gather", 0, 2 * gather)  # forward and backward each gather the active rows
    out.add("lse", 2 * n_active * h * v, v * h * elt + n_active * h * elt)
    s = max(1, min(vocab_slice, v))
    gw = 8 if main_grad else elt
    for cols, count in _parts(v, s):
        out.add("dlogits", 2 * n_active * cols * h,
                n_active * h * elt + cols * h * elt + n_active * cols * elt, count)
        out.add("grad_weight", 2 * n_active * cols * h,
                n_active * cols * elt + n_active * h * elt + cols * h * gw, count)
    for i, (cols, count) in enumerate(_parts(v, s * max(1, grad_h_slices))):
        first = 4 * n_active * h if i == 0 else 0  # the first pass only writes
        out.add("grad_hidden", 2 * n_active * cols * h,
                n_active * cols * elt + cols * h * elt + 8 * n_active * h - first / count, count)
    out.add("scatter", 0, scatter)
    return out


def train_launches(n: int, n_active: int, h: int, v: int, elt: int, row_chunk: int,
                   group_rows: int, main_grad: bool = True) -> Launches:
    """Launches of the three-matmul design: per chunk of ``row_chunk`` rows the fp32 logits
    (``W`` read once), the statistics pass and the ``dlogits`` pass over the chunk; per group
    of ``group_rows`` rows (a multiple of the chunk; the chunk itself for fp32) one ``grad_h``
    matmul (``W`` read again) and one ``grad_W`` matmul that reads and writes ``main_grad``
    (without ``main_grad`` the first group only writes the fp32 gradient)."""
    out = Launches()
    if not n_active or not v:
        return out
    gather, scatter = _rows(n, n_active, h, elt)
    out.add("gather", 0, gather)
    c = max(1, min(row_chunk, n_active))
    r = c if elt == 4 else max(c, min(group_rows, n_active))
    dl = 4 if elt == 4 else elt  # fp32: dlogits in place in the logits buffer
    for rows, count in _parts(n_active, c):
        out.add("logits", 2 * rows * h * v, v * h * elt + rows * h * elt + 4 * rows * v, count)
        out.add("chunk_stats", 0, 4 * rows * v, count)
        out.add("chunk_dlogits", 0, 4 * rows * v + dl * rows * v, count)
    for i, (rows, count) in enumerate(_parts(n_active, r)):
        out.add("grad_hidden", 2 * rows * v * h, rows * v * dl + v * h * elt + 4 * rows * h, count)
        first = 0 if main_grad or i else 4 * v * h  # an fp32 gradient: the first only writes
        out.add("grad_weight", 2 * rows * v * h,
                rows * v * dl + rows * h * elt + 8 * v * h - first / count, count)
    out.add("scatter", 0, scatter)
    return out


# ============================================================================ the choice
@dataclass(frozen=True)
class TrainPlan:
    """The chosen design and its sizes, with the model's prediction (computed, not measured)."""

    path: str              # "three_matmul" or "recompute"
    row_chunk: int         # rows of fp32 logits per chunk (three-matmul)
    group_rows: int        # rows of dlogits per grad_h / grad_W pass (three-matmul)
    grad_h_slices: int     # vocabulary slices per grad_h pass (recompute)
    reason: str
    predicted: dict        # per design: seconds, GB moved, main_grad GB (empty on CPU)

    def line(self) -> str:
        """One log line: the choice and why."""
        return (f"flce plan: {self.path} (row_chunk={self.row_chunk}, group_rows="
                f"{self.group_rows}, grad_h_slices={self.grad_h_slices}): {self.reason}")


def summary(launches: Launches, peak: DevicePeak, elt: int) -> dict:
    """Predicted seconds, GB moved, main_grad GB (the ``grad_weight`` launches) and TFLOP."""
    return {"seconds": launches.seconds(peak, elt), "gb": launches.bytes / 1e9,
            "main_grad_gb": launches.bytes_of("grad_weight") / 1e9,
            "tflop": launches.flops / 1e12}


def best_train_sizes(n_active: int, h: int, v: int, elt: int, budget_bytes: float,
                     step: int, peak: DevicePeak, main_grad: bool = True) -> tuple[int, int]:
    """``(row_chunk, group_rows)`` of the three-matmul design with the smallest predicted
    time whose buffers (fp32 logits ``4 C V`` + ``dlogits`` ``e R V`` for 16-bit weights; the
    logits buffer alone for fp32) fit ``budget_bytes``; multiples of ``step``, at least one
    ``step`` each."""
    n_active = max(n_active, 1)
    best, best_t = (step, step), float("inf")
    c = step
    while True:
        if elt == 4:
            fits = 4 * c * v <= budget_bytes
            r = c
        else:
            r = int((budget_bytes - 4 * c * v) // (elt * v)) // c * c
            fits = r >= c
        if not fits and c > step:
            break
        r = max(r, c)
        t = train_launches(n_active, n_active, h, v, elt, c, r, main_grad).seconds(peak, elt)
        if t < best_t:
            best, best_t = (c, r), t
        if c >= n_active or not fits:
            break
        c += step
    return best
