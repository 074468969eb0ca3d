"""One launch of each piece of work of the fused linear cross-entropy, in Triton and in plain
PyTorch, and the :data:`WORK` counter that records every matmul launched.

Triton (:mod:`.flce_kernels`, tiles from :mod:`.flce_tuning`): ``lse_partials_triton``
(forward statistics), ``grad_logits_triton`` (a recomputed ``dlogits`` slice),
``matmul_triton`` (``c (+)= a @ b``, fp32 accumulation), and the training path's
``chunk_stats_triton`` / ``chunk_dlogits_triton``. PyTorch twins under the same precision
policy (:func:`~.flce_tuning.dot_precision`): ``lse_partials_torch``, ``grad_logits_torch``,
``matmul_torch``. Every Triton launch goes through :func:`soda_kernels._launch.launch`, so
:mod:`.compile_check` records and compiles exactly what production launches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton

from soda_kernels._launch import gpu_like, launch
from soda_kernels._vocab_parallel import check_triton_tensors, interpreting, merge_partials
from soda_kernels.flce_kernels import _chunk_dlogits_kernel, _chunk_stats_kernel
from soda_kernels.flce_tuning import _MATMUL_ROLE_KEYS, _PINNED, CONFIGS, _flags, _run


# ============================================================================ work counter
@dataclass
class WorkCounter:
    """Matmuls launched by this module since :meth:`reset`: ``(name, M, N, K)`` each.

    ``name`` is ``lse`` (forward logits), ``dlogits`` (recomputed logits), ``grad_weight``
    or ``grad_hidden``; ``M x K`` times ``K x N``. Host-side bookkeeping, no device sync.
    """

    calls: list = field(default_factory=list)

    def reset(self) -> None:
        self.calls.clear()

    def add(self, name: str, m: int, n: int, k: int) -> None:
        self.calls.append((name, int(m), int(n), int(k)))

    @property
    def flops(self) -> int:
        return sum(2 * m * n * k for _, m, n, k in self.calls)


WORK = WorkCounter()


# ============================================================================ launchers
def _splits(rows: int, cols: int, block_rows: int, block_cols: int,
            device: torch.device, whole_waves: bool = False) -> int:
    """Column splits of a (row tiles x column splits) grid: enough programs to fill the GPU
    (~4 per SM); 1 on CPU. ``meta`` (compile_check's production launches): an H100 SXM.
    ``whole_waves``: then up to twice as many, as :func:`wave_splits` picks for the lse
    kernel's tiles."""
    if not gpu_like(device) or interpreting():
        return 1
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 132)
    first = max(1, min(triton.cdiv(4 * sms, triton.cdiv(rows, block_rows)),
                       triton.cdiv(cols, block_cols)))
    if not whole_waves:
        return first
    tiles = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"]) for c in CONFIGS["lse"]]
    return wave_splits(rows, cols, sms, first, tiles, max_splits=triton.cdiv(cols, block_cols))


def wave_splits(rows: int, cols: int, sms: int, first: int, tiles: list,
                max_splits: int) -> int:
    """Column splits in ``[first, min(2 first, max_splits)]`` that lower the grid's
    wave-quantised time where that costs nothing. The time of a (row tiles x splits) grid is
    ``ceil(programs / slots) x ceil(column tiles / splits)`` (waves rounded up, times the
    longest program); it is taken for every tile shape ``(block_rows, block_cols)`` in
    ``tiles`` (the autotuner picks one on the GPU, after the splits are fixed) at 1 and at 2
    resident programs per SM (slots = ``sms`` or ``2 sms``). Candidates that make any of these
    longer than ``first`` splits do are refused; of the rest, the smallest mean ratio wins
    (the fewest splits on a tie). So the answer is often ``first``: at TP1, V = 144,644,
    8192 rows (576 programs of 128 x 128 = 4.36 waves on 132 SMs) every larger count costs
    the 64 x 256 tiles more. NOTE: a model of the grid, not a measurement; more splits only
    add ``[3, splits, rows]`` fp32 partials to merge (1.2 MB at 16384 rows, 6 splits)."""
    def cdiv(a: int, b: int) -> int:  # NOTE: triton.cdiv is a ConstexprFunction, ~30 us a call
        return -(-a // b)

    def cost(s: int, block_rows: int, block_cols: int, per_sm: int) -> int:
        return cdiv(cdiv(rows, block_rows) * s, sms * per_sm) * cdiv(cdiv(cols, block_cols), s)

    models = [(br, bc, per_sm) for br, bc in tiles for per_sm in (1, 2)]
    base = [cost(first, *m) for m in models]
    free = [s for s in range(first, max(first, min(2 * first, max_splits)) + 1)
            if all(cost(s, *m) <= b for m, b in zip(models, base))]
    return min(free, key=lambda s: (sum(cost(s, *m) / b for m, b in zip(models, base)), s))


def lse_partials_triton(hidden, weight, labels, vocab_start: int, n_valid: int,
                        splits: int | None = None, blocks: dict | None = None):
    """This rank's ``(max, sum-exp, target logit)`` per row of ``hidden`` over columns
    ``[0, n_valid)`` (``hidden`` holds the active rows only)."""
    check_triton_tensors(hidden, weight, labels)
    n, h = hidden.shape
    splits = splits or _splits(n, n_valid, 128, 128, hidden.device, whole_waves=True)
    stats = torch.empty(3, splits, n, device=hidden.device, dtype=torch.float32)
    WORK.add("lse", n, n_valid, h)
    if n == 0 or n_valid == 0:
        stats[0].fill_(float("-inf"))
        stats[1:].zero_()
        return merge_partials(stats[0], stats[1], stats[2], dim=0)
    args = (hidden, weight, labels, stats[0], stats[1], stats[2], n, h, n_valid, vocab_start,
            splits, hidden.stride(0), weight.stride(0))
    _run("lse", hidden.device, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits), args,
         _flags(hidden), blocks)
    return merge_partials(stats[0], stats[1], stats[2], dim=0)


def padded_width(cols: int, impl: str = "triton") -> int:
    """Columns of a ``dlogits`` slice of ``cols`` vocabulary columns: for ``impl="triton"``
    rounded up to a multiple of 16 (the extra columns hold zeros). A ragged last slice (TP1
    V = 144,644; TP2 rank 1; TP8 rank 7) then keeps 16-divisible bounds, and Triton keeps the
    dlogits stores and the matmuls' operand loads vectorised and asynchronous (with a width
    that is not a multiple of 16 they fall back to scalar 2-byte loads inside the main loop;
    ``compile_check`` shows both)."""
    return cols + (-cols % 16) if impl == "triton" else cols


def grad_logits_triton(h_a, w_slice, labels_a, lse_a, g_a, col_start: int, z_loss: float, out,
                       key_v: int | None = None, blocks: dict | None = None):
    """Fill ``out`` (``[rows, >= S]``, any row stride) with ``dloss/dlogits`` of the slice
    ``w_slice [S, H]`` whose first row has global id ``col_start``; columns of ``out`` beyond
    ``S`` (the :func:`padded_width` padding) get zeros."""
    check_triton_tensors(h_a, w_slice)
    rows, h = h_a.shape
    cols, store = w_slice.shape[0], out.shape[1]
    WORK.add("dlogits", rows, cols, h)
    if rows == 0 or cols == 0:
        out.zero_()
        return out
    # NOTE: Triton 3.8's interpreter truncates fp32 -> bf16 stores (GPUs round to nearest
    # even); there the kernel writes fp32 and torch rounds.
    dest = out if out.dtype == torch.float32 or not interpreting() else out.float()
    args = (h_a, w_slice, labels_a, lse_a, g_a, dest, rows, h, cols, store, col_start,
            float(z_loss), h_a.stride(0), w_slice.stride(0), dest.stride(0), key_v or cols)
    _run("dlogits", h_a.device,
         lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]) * triton.cdiv(store, meta["BLOCK_V"]),),
         args, _flags(h_a), blocks)
    if dest is not out:
        out.copy_(dest)
    return out


def _tma_allocator(size: int, alignment: int, stream):
    """Global scratch for the device-side TMA descriptors of ``_matmul_tma_kernel``."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def matmul_triton(a, b, c, accumulate: bool, name: str = "matmul", key_h: int = 0,
                  key_v: int = 0, blocks: dict | None = None, tma: bool = False):
    """``c (+)= a @ b`` (2-D, any strides) with fp32 accumulation; ``c`` fp32 or ``a``'s dtype.

    ``a`` may be larger than ``[c rows, b rows]``: its extra rows / columns must be zeros (a
    :func:`padded_width` dlogits slice); they are loaded, never stored. Without
    ``accumulate`` ``c`` may have more columns than ``b`` (a :func:`padded_width` logits
    chunk): they get zeros. ``name`` is the role
    (``grad_weight`` / ``grad_hidden``: separate autotune entries) and the :data:`WORK` name.
    ``tma`` reads both operands through TMA descriptors (``_matmul_tma_kernel``; ``b`` and
    ``a`` or ``a^T`` row-major): compiled and checked for sm_90a, not timed, so off by default.
    """
    check_triton_tensors(a, b, c)
    (a_m, a_k), (k, n), (m, c_n) = a.shape, b.shape, c.shape
    if a_m < m or a_k < k or c_n < n or (accumulate and c_n != n):
        raise ValueError(f"matmul_triton: a {tuple(a.shape)}, b {tuple(b.shape)}, c {tuple(c.shape)}")
    WORK.add(name, m, n, k)
    if m == 0 or c_n == 0:
        return c
    if k == 0 or n == 0:
        if not accumulate:
            c.zero_()
        return c
    # NOTE: Triton 3.8's interpreter truncates fp32 -> bf16 stores; there a bf16 ``c`` (a
    # slice of the returned grad_W) goes through an fp32 copy of the same size.
    dest = c if c.dtype == torch.float32 or not interpreting() else c.float()
    role = name if name in _MATMUL_ROLE_KEYS else "matmul"
    args = (a, b, dest, m, n, k, a_m, a_k, c_n, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            dest.stride(0), dest.stride(1), key_h, key_v, _MATMUL_ROLE_KEYS[role])
    consts = dict(ACCUMULATE=accumulate, **_flags(a))
    if tma:
        if b.stride(1) != 1 or min(a.stride()) != 1:
            raise ValueError("matmul_triton(tma=True) needs row-major b and row- or column-major a")
        consts["A_COL_MAJOR"] = a.stride(0) == 1 and a.stride(1) != 1
        if a.device.type == "cuda":
            triton.set_allocator(_tma_allocator)
        role += "_tma"
    _run(role, a.device,
         lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
         args, consts, blocks)
    if dest is not c:
        c.copy_(dest)
    return c


# ----------------------------------------------------------------------------- plain PyTorch
def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a @ b`` under the module's precision policy (bf16/fp16: fp32 accumulation)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            pass  # NOTE: a torch without mm(out_dtype=) on CUDA: exact upcast, slower
    return a.float() @ b.float()  # CPU: exact products, fp32 sums (slice-sized upcasts)


def lse_partials_torch(hidden, weight, labels, vocab_start: int, n_valid: int, vocab_slice: int):
    """Same statistics as :func:`lse_partials_triton`, one ``[rows, S]`` fp32 slice at a time."""
    n = hidden.shape[0]
    m = torch.full((n,), float("-inf"), device=hidden.device)
    s = torch.zeros(n, device=hidden.device)
    t = torch.zeros(n, device=hidden.device)
    WORK.add("lse", n, n_valid, hidden.shape[1])
    if n_valid == 0 or n == 0:
        return m, s, t
    local = labels.long() - vocab_start
    for v0 in range(0, n_valid, vocab_slice):
        x = _mm_f32(hidden, weight[v0:min(v0 + vocab_slice, n_valid)].t())
        inside = (local >= v0) & (local < v0 + x.shape[1])
        picked = x.gather(1, (local - v0).clamp(0, x.shape[1] - 1)[:, None]).squeeze(1)
        t += torch.where(inside, picked, torch.zeros_like(picked))
        m_s = x.amax(1)
        s_s = x.sub_(m_s[:, None]).exp_().sum(1)
        del x
        big = torch.maximum(m, m_s)
        s = s * torch.exp(m - big) + s_s * torch.exp(m_s - big)
        m = big
    return m, s, t


def subtract_target_(x: torch.Tensor, local: torch.Tensor, g: torch.Tensor) -> None:
    """``x[n, local[n]] -= g[n]`` where ``0 <= local[n] < x.shape[1]``, without a host sync
    (no boolean indexing): elsewhere ``-0.0`` is added, which leaves every value's bits as
    they are, as ``x - g`` and ``x + (-g)`` are the same IEEE result."""
    inside = (local >= 0) & (local < x.shape[1])
    if x.shape[1]:
        x.scatter_add_(1, local.clamp(0, x.shape[1] - 1)[:, None],
                       torch.where(inside, -g, -0.0).to(x.dtype)[:, None])


def grad_logits_torch(h_a, w_slice, labels_a, lse_a, g_a, col_start: int, z_loss: float, out,
                      **_):
    WORK.add("dlogits", h_a.shape[0], w_slice.shape[0], h_a.shape[1])
    x = _mm_f32(h_a, w_slice.t())
    x.sub_(lse_a[:, None]).exp_().mul_((g_a * (1.0 + 2.0 * z_loss * lse_a))[:, None])
    # NOTE: as in the Triton kernel, rows with g = 0 are 0 even where exp overflowed (masked
    # rows keep lse 0 on a GPU, see flce_backward.compacts_rows).
    x.masked_fill_((g_a == 0)[:, None], 0.0)
    subtract_target_(x, labels_a.long() - col_start, g_a)
    out[:, :x.shape[1]].copy_(x)
    out[:, x.shape[1]:].zero_()
    return out


def matmul_torch(a, b, c, accumulate: bool, name: str = "matmul", **_):
    """``c (+)= a @ b`` in plain PyTorch under the same precision policy (``a`` cut to
    ``[c rows, b rows]``, as :func:`matmul_triton` allows)."""
    a = a[:c.shape[0], :b.shape[0]]
    WORK.add(name, a.shape[0], b.shape[1], a.shape[1])
    if a.dtype == torch.float32:
        if accumulate:
            c.addmm_(a, b)
        else:
            torch.mm(a, b, out=c)
        return c
    r = _mm_f32(a, b)
    if accumulate:
        c.add_(r)
    else:
        c.copy_(r)
    return c


# ============================================================================ chunk kernels
#: Fixed tiles of the two element-wise kernels (memory-bound: one pass each over the chunk).
#: CPU interpreter: few, small programs. :func:`~.flce_tuning.pinned_configs` (roles
#: ``chunk_stats`` / ``chunk_dlogits``) overrides them: the tests run the GPU tiles there.
_STATS_BLOCKS = {"cuda": dict(BLOCK_N=4, BLOCK_V=1024, num_warps=4),
                 "cpu": dict(BLOCK_N=16, BLOCK_V=64)}
_DLOGITS_BLOCKS = {"cuda": dict(BLOCK_N=8, BLOCK_V=512, num_warps=4),
                   "cpu": dict(BLOCK_N=16, BLOCK_V=64)}


def _blocks(role: str, table: dict, device: torch.device) -> dict:
    if role in _PINNED:
        return dict(_PINNED[role])
    return dict(table["cuda" if gpu_like(device) and not interpreting() else "cpu"])


def chunk_stats_triton(x, labels_c, vocab_start: int, splits: int | None = None,
                       n_cols: int = -1):
    """This rank's ``(max, sum-exp, target logit)`` per row of the fp32 chunk ``x [C, >= V]``
    over its first ``n_cols`` columns (default all; the rest is padding that is loaded, so
    the loads stay vectorised, and not counted)."""
    check_triton_tensors(x, labels_c)
    c, width = x.shape
    v = width if n_cols < 0 else n_cols
    cfg = _blocks("chunk_stats", _STATS_BLOCKS, x.device)
    splits = splits or _splits(c, v, cfg["BLOCK_N"], cfg["BLOCK_V"], x.device)
    stats = torch.empty(3, splits, c, device=x.device, dtype=torch.float32)
    launch("chunk_stats", _chunk_stats_kernel, (triton.cdiv(c, cfg["BLOCK_N"]), splits),
           (x, labels_c, stats[0], stats[1], stats[2], c, v, width, vocab_start, splits,
            x.stride(0)), cfg)
    return merge_partials(stats[0], stats[1], stats[2], dim=0)


def chunk_dlogits_triton(x, dl, labels_c, lse, g_c, vocab_start: int, z_loss: float,
                         n_cols: int = -1):
    """Fill ``dl`` (``x`` itself, or a 16-bit buffer of ``x``'s shape) with ``g dloss/dlogits``
    of ``x``'s first ``n_cols`` columns (default all) and zeros in the rest."""
    check_triton_tensors(x, dl, labels_c)
    c, store = x.shape
    v = store if n_cols < 0 else n_cols
    cfg = _blocks("chunk_dlogits", _DLOGITS_BLOCKS, x.device)
    # NOTE: Triton 3.8's interpreter truncates fp32 -> bf16 stores (GPUs round to nearest
    # even); there the kernel writes fp32 in place and torch rounds.
    dest = x if interpreting() else dl
    grid = (triton.cdiv(c, cfg["BLOCK_N"]), triton.cdiv(store, cfg["BLOCK_V"]))
    launch("chunk_dlogits", _chunk_dlogits_kernel, grid,
           (x, dest, labels_c, lse, g_c, c, v, store, vocab_start, float(z_loss), x.stride(0),
            dest.stride(0)), cfg)
    if dest is not dl:
        dl.copy_(dest)
    return dl
