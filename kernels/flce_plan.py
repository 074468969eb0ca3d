"""The plan of the three-matmul training path (:mod:`.flce_train`): chunk and group heights,
the memory bound, the cost model, and the choice between it and the recompute path.

The forward keeps the fp32 logits of a **chunk** of ``C`` rows (``4 C V`` bytes) and, for
16-bit weights, the ``dlogits`` of a **group** of ``R`` rows (``R`` a multiple of ``C``; ``e R
V`` bytes); each group costs one ``grad_h`` and one ``grad_W`` matmul, so ``W`` is read once
per chunk and once per group and ``main_grad`` (fp32 ``V H``) read and written once per
group. Both buffers together take at most :data:`CHUNK_SHARE` of ``W`` and its gradient
buffer: the loss stays within 1.2x the logits-free minimum. For fp32 weights the ``dlogits``
overwrite the logits in place and a group is a chunk.

:func:`choose_train_plan`: on a CUDA device the roofline model of :mod:`.flce_roofline`
picks the design (three matmuls or recompute) and, for three matmuls, the ``(C, R)`` with the
smallest predicted time inside the budget; on CPU (and under the interpreter) the three-matmul
path with one group per chunk (the choice the CPU measurements were made with). This is the
prior: ``loss_plan=measure`` (and ``auto`` on a GPU) times the designs on the device instead
(:mod:`.flce_measure`) and logs this prediction beside the measurement.
"""

from __future__ import annotations

import logging

import torch

from soda_kernels._launch import gpu_like
from soda_kernels._vocab_parallel import interpreting
from soda_kernels.flce_backward import default_vocab_slice, row_multiple
from soda_kernels.flce_roofline import (
    DevicePeak,
    TrainPlan,
    best_train_sizes,
    device_peak,
    ideal_work,
    recompute_launches,
    summary,
    train_launches,
)

LOG = logging.getLogger("soda_kernels.flce")

#: Share of the bytes of ``W`` and its gradient buffer the chunk buffers may take (see the
#: module docstring): the loss's other temporaries fit in the rest of the 20% allowance.
CHUNK_SHARE = 0.15


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def chunk_row_bytes(n_valid: int, dtype: torch.dtype) -> int:
    """Bytes per chunk row: the fp32 logits / dlogits row, plus a 16-bit dlogits copy."""
    e = _elt(dtype)
    return n_valid * (4 + (0 if e == 4 else e))


def default_row_chunk(h: int, n_valid: int, dtype: torch.dtype, device: torch.device,
                      impl: str = "torch", main_grad: bool = False) -> int:
    """Rows per chunk: the chunk buffers take at most :data:`CHUNK_SHARE` of ``W`` and its
    gradient buffer (``V H (e + e_g)`` bytes, ``e_g`` = 4 for an fp32 ``main_grad``, else
    ``e``), at least one matmul tile; a multiple of ``row_multiple`` (64 on CUDA) and of 16.

    This is the budget of the chunk buffers: on a GPU :func:`choose_train_plan` spends it on a
    smaller fp32 chunk and a taller 16-bit ``dlogits`` group (fewer ``main_grad`` passes); on
    CPU the chunk takes all of it and a group is one chunk."""
    if n_valid <= 0:
        return 64
    e = _elt(dtype)
    budget = CHUNK_SHARE * n_valid * h * (e + (4 if main_grad else e))
    rows = int(budget // chunk_row_bytes(n_valid, dtype))
    step = max(16, row_multiple(device, impl))
    return max(step, rows // step * step)


def train_extra_bytes(n_active: int, h: int, n_valid: int, row_chunk: int, dtype: torch.dtype,
                      impl: str = "torch", group_rows: int = 0) -> int:
    """Upper bound of the temporaries of the forward (besides inputs, ``grad_W`` / ``main_grad``
    and the outputs): the fp32 chunk buffer (``4 C V``), for 16-bit weights the group's
    ``dlogits`` (``e R V``, ``R`` = ``group_rows`` or the chunk), compacted rows ``h_a``
    (``N_a H e``), the fp32 ``grad_h`` kept for backward (``4 N_a H``), O(N_a) vectors;
    ``impl="torch"`` with 16-bit operands on CPU adds slice-sized fp32 upcasts and matmul
    results."""
    e = _elt(dtype)
    n_active += -n_active % row_multiple(torch.device("cuda"), impl) if impl == "triton" else 0
    rows = min(row_chunk, max(n_active, 1))
    group = rows if e == 4 else min(max(group_rows, rows), max(n_active, 1))
    width = n_valid + 64  # + Triton's row padding
    extra = 4 * rows * width + (0 if e == 4 else e * group * width) + n_active * h * (e + 4) \
        + 64 * n_active
    if e != 4:
        s = default_vocab_slice(h, n_valid, torch.device("cpu"))
        extra += 4 * (rows * h + 2 * s * h + group * s)  # upcasts of h_c, a W slice; results
        if interpreting():
            extra += 4 * group * n_valid  # bf16 matmul outputs pass through fp32 copies
    return extra


def train_cost_model(n: int, n_active: int, h: int, n_valid: int, elt: int, row_chunk: int,
                     main_grad: bool = True, group_rows: int = 0) -> dict:
    """FLOPs and DRAM bytes of one forward + backward of the three-matmul path.

    ``flops`` = ``6 N_a H V`` (logits, grad_h, grad_W); ``ideal_flops`` = ``6 N H V``.
    ``bytes``: the launches of :func:`~.flce_roofline.train_launches` (perfectly tiled,
    weight re-reads served by L2): the row gather, per chunk ``W`` read by the logits matmul
    and the chunk's fp32 logits written once and read by the two Triton kernels, ``dlogits``
    (``elt`` bytes: in place in fp32, else the 16-bit group buffer) written once and read by
    the two gradient matmuls, per group (``group_rows``, default one chunk) ``W`` read by
    ``grad_h`` and the fp32 ``main_grad`` read and written by ``grad_W``, the fp32 ``grad_h``
    written and read back by the backward, ``grad_hidden`` written. ``ideal_bytes``: read
    ``W`` and ``h`` once, write ``grad_W`` and ``grad_h`` once.
    """
    group = max(group_rows, row_chunk)
    launches = train_launches(n, n_active, h, n_valid, elt, row_chunk, group, main_grad)
    chunks = -(-n_active // max(1, row_chunk)) if n_active else 0
    groups = -(-n_active // max(1, row_chunk if elt == 4 else group)) if n_active else 0
    return {"flops": launches.flops, "bytes": launches.bytes,
            **ideal_work(n, h, n_valid, elt, main_grad),
            "chunks": chunks, "groups": groups,
            "main_grad_bytes": launches.bytes_of("grad_weight")}


# ============================================================================ the choice
def plan_for_peak(n: int, h: int, n_valid: int, dtype: torch.dtype, peak: DevicePeak,
                  step: int = 64, main_grad: bool = True, vocab_slice: int = 0,
                  grad_h_slices: int = 1) -> TrainPlan:
    """The roofline choice for ``n`` active rows on a device with ``peak`` (computed, not
    measured): the three-matmul design at its best ``(C, R)`` inside the budget of
    :func:`default_row_chunk`, or the recompute design with ``vocab_slice`` /
    ``grad_h_slices``, whichever the model predicts faster."""
    e = _elt(dtype)
    budget = default_row_chunk(h, n_valid, dtype, torch.device("cuda"), "triton", main_grad) \
        * chunk_row_bytes(n_valid, dtype)
    c, r = best_train_sizes(n, h, n_valid, e, budget, step, peak, main_grad)
    s = vocab_slice or default_vocab_slice(h, n_valid, torch.device("cuda"))
    three = summary(train_launches(n, n, h, n_valid, e, c, r, main_grad), peak, e)
    rec = summary(recompute_launches(n, n, h, n_valid, e, s, main_grad, grad_h_slices), peak, e)
    path = "three_matmul" if three["seconds"] <= rec["seconds"] else "recompute"
    reason = (f"{peak.name} roofline (computed, not measured): three matmuls "
              f"{three['seconds'] * 1e3:.2f} ms ({three['gb']:.1f} GB, main_grad "
              f"{three['main_grad_gb']:.1f} GB) vs recompute {rec['seconds'] * 1e3:.2f} ms "
              f"({rec['gb']:.1f} GB, {rec['tflop']:.2f} TFLOP)")
    return TrainPlan(path, c, r, grad_h_slices, reason,
                     {"three_matmul": three, "recompute": rec, "device": peak.name})


_LOGGED: set = set()
_PLANS: dict = {}


def choose_train_plan(n: int, h: int, n_valid: int, dtype: torch.dtype, device: torch.device,
                      impl: str, main_grad: bool, vocab_slice: int, grad_h_slices: int,
                      row_chunk: int = 0, group_rows: int = 0) -> TrainPlan:
    """The design and sizes of one call (see the module docstring); a caller's ``row_chunk``
    / ``group_rows`` force the three-matmul path with those sizes. Each distinct plan is
    logged once at DEBUG level on the ``soda_kernels.flce`` logger (choice and reason)."""
    step = max(16, row_multiple(device, impl))
    default = default_row_chunk(h, n_valid, dtype, device, impl, main_grad)
    if row_chunk or group_rows:
        c = row_chunk or default
        r = c if _elt(dtype) == 4 else max(c, (group_rows or c) // c * c)
        plan = TrainPlan("three_matmul", c, r, grad_h_slices, "sizes given by the caller", {})
    elif device.type != "cuda" or interpreting() or not gpu_like(device):
        plan = TrainPlan("three_matmul", default, default, grad_h_slices,
                         "CPU: three matmuls, one group per chunk (the measured CPU choice)", {})
    else:
        name = torch.cuda.get_device_name(device)
        key = (n, h, n_valid, dtype, name, step, main_grad, vocab_slice, grad_h_slices)
        if key not in _PLANS:  # NOTE: the search costs ~ms; one per shape per process
            _PLANS[key] = plan_for_peak(n, h, n_valid, dtype, device_peak(name), step, main_grad,
                                        vocab_slice, grad_h_slices)
        plan = _PLANS[key]
    logged = (plan.path, plan.row_chunk, plan.group_rows, plan.grad_h_slices, n, h, n_valid)
    if logged not in _LOGGED:
        _LOGGED.add(logged)
        LOG.debug(plan.line())
    return plan
